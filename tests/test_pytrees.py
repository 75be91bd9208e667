"""Parameters as any pytree (kfac_func.tree): an MLP written as a function of nested parameters gives
exactly (``torch.equal``) what the same function of the flat dict, named by hand, gives — capture, trace,
precondition, the quadratic forms and describe — with outputs in the caller's structure, and errors that
name the leaf's path."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch import Tensor, nn

import kfac_func as kf
from kfac_func.quadratic import fisher_quadratic_forms, ggn_quadratic_forms, ggn_vector_product
from kfac_func import tree
from kfac_func.tree import Spec, flatten

DT = torch.float64


class Layer(NamedTuple):
    w: Tensor
    b: Tensor


class Case(NamedTuple):
    """A structure: build it from ``[(w, b), ...]``, read the pairs back, and the path names by hand."""

    build: Callable[[list[tuple[Tensor, Tensor]]], Any]
    pairs: Callable[[Any], list[tuple[Tensor, Tensor]]]
    names: Callable[[int], tuple[str, str]]


CASES = {
    "dict": Case(
        lambda ps: {f"l{i}": {"weight": w, "bias": b} for i, (w, b) in enumerate(ps)},
        lambda t: [(t[k]["weight"], t[k]["bias"]) for k in sorted(t)],
        lambda i: (f"l{i}.weight", f"l{i}.bias"),
    ),
    "tuple": Case(tuple, lambda t: list(t), lambda i: (f"{i}.0", f"{i}.1")),
    "list": Case(lambda ps: [x for p in ps for x in p], lambda t: list(zip(t[::2], t[1::2])),
                 lambda i: (str(2 * i), str(2 * i + 1))),
    "namedtuple": Case(lambda ps: tuple(Layer(*p) for p in ps), lambda t: [(l.w, l.b) for l in t],
                       lambda i: (f"{i}.0", f"{i}.1")),
}


def mlp(pairs: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    for i, (w, b) in enumerate(pairs):
        x = F.linear(x if i == 0 else torch.tanh(x), w, b)
    return x


def setup(case: Case, widths: list[int], seed: int):
    """``(f_tree, tree, f_flat, flat, x, y)`` for an MLP on ``widths`` (same tensor objects in both)."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(o, i, generator=g, dtype=DT), torch.randn(o, generator=g, dtype=DT))
             for i, o in zip(widths, widths[1:])]
    names = [case.names(i) for i in range(len(pairs))]
    flat = {n: t for (nw, nb), (w, b) in zip(names, pairs) for n, t in ((nw, w), (nb, b))}
    x = torch.randn(5, widths[0], generator=g, dtype=DT)
    y = torch.randint(0, widths[-1], (5,), generator=g)
    f_tree = lambda p, x: mlp(case.pairs(p), x)  # noqa: E731
    f_flat = lambda p, x: mlp([(p[w], p[b]) for w, b in names], x)  # noqa: E731
    return f_tree, case.build(pairs), f_flat, flat, x, y


def assert_equal_trees(got: Any, like: Any, flat: dict[str, Tensor]) -> None:
    """``got`` has ``like``'s structure and, leaf by leaf, exactly the tensors of ``flat``."""
    assert optree.tree_structure(got) == optree.tree_structure(like)
    leaves = flatten(got)[0]
    assert leaves.keys() == flat.keys()
    assert all(torch.equal(leaves[n], flat[n]) for n in flat)


@given(case=st.sampled_from(sorted(CASES)), fisher=st.sampled_from(["exact", "empirical"]),
       hidden=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(case="dict", fisher="exact", hidden=3, seed=0)
@example(case="tuple", fisher="empirical", hidden=2, seed=1)
def test_nested_params_equal_the_flat_dict_exactly(case: str, fisher: str, hidden: int, seed: int):
    f_tree, tree, f_flat, flat, x, y = setup(CASES[case], [3, hidden, 2], seed)
    plan_tree, plan_flat = kf.trace(f_tree, tree, x), kf.trace(f_flat, flat, x)
    assert plan_tree.layers == plan_flat.layers and plan_tree.untracked == plan_flat.untracked == ()
    assert kf.trace(f_tree, tree, x) is plan_tree  # cached by names and shapes
    cap_tree = kf.capture(f_tree, tree, x, y, "cross_entropy", fisher=fisher)
    cap_flat = kf.capture(f_flat, flat, x, y, "cross_entropy", fisher=fisher)
    assert torch.equal(cap_tree.loss, cap_flat.loss)
    assert_equal_trees(cap_tree.grads, tree, cap_flat.grads)
    assert cap_tree.a.keys() == cap_flat.a.keys() == plan_flat.layers.keys()
    assert all(torch.equal(cap_tree.a[k], cap_flat.a[k]) for k in cap_flat.a)
    assert all(torch.equal(cap_tree.g[k], cap_flat.g[k]) for k in cap_flat.g)
    with_plan = kf.capture(f_tree, tree, x, y, "cross_entropy", fisher=fisher, plan=plan_tree)
    assert_equal_trees(with_plan.grads, tree, cap_flat.grads)

    factors = kf.eigendecompose(kf.kronecker_factors(cap_flat))
    update = kf.precondition(tree, cap_tree.grads, factors, layers=plan_tree.layers, damping=1e-2)
    expected = kf.precondition(flat, cap_flat.grads, factors, layers=plan_flat.layers, damping=1e-2)
    assert_equal_trees(update, tree, expected)

    directions = [cap_tree.grads, update]
    flat_directions = [cap_flat.grads, flatten(update)[0]]
    assert torch.equal(fisher_quadratic_forms(cap_tree, directions, plan_tree.layers),
                       fisher_quadratic_forms(cap_flat, flat_directions, plan_flat.layers))
    assert torch.equal(ggn_quadratic_forms(f_tree, tree, x, y, "cross_entropy", directions),
                       ggn_quadratic_forms(f_flat, flat, x, y, "cross_entropy", flat_directions))
    assert_equal_trees(ggn_vector_product(f_tree, tree, x, y, "cross_entropy", update), tree,
                       ggn_vector_product(f_flat, flat, x, y, "cross_entropy", flat_directions[1]))
    names = [e.parameter for e in kf.describe(f_tree, x, tree).entries]
    assert names == list(flatten(tree)[0]) and sorted(names) == sorted(flat)


def test_module_takes_nested_params_named_like_its_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    flat = {n: p.detach() for n, p in model.named_parameters()}
    nested = {k: {"weight": flat[f"{k}.weight"], "bias": flat[f"{k}.bias"]} for k in ("0", "2")}
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    assert torch.equal(kf.as_function(model)(nested, x), model(x))
    cap = kf.capture(model, nested, x, y, "cross_entropy", fisher="exact")
    assert_equal_trees(cap.grads, nested, kf.capture(model, flat, x, y, "cross_entropy", fisher="exact").grads)
    assert list(cap.a) == ["0", "2"]


def test_flatten_names_and_unflatten_round_trip():
    w, b = torch.zeros(2, 3), torch.zeros(2)
    flat = {"0.weight": w, "0.bias": b}
    got, spec = flatten(flat)
    assert got == flat and got is not flat and spec == Spec(("0.weight", "0.bias"))
    tree = {"l2": (w, None), "l1": {"w": w, "b": [b]}}
    got, spec = flatten(tree)
    assert list(got) == ["l1.b.0", "l1.w", "l2.0"]  # optree's order: dict keys sorted; None is no leaf
    back = spec.unflatten({n: t + 1 for n, t in got.items()})
    assert optree.tree_structure(back, none_is_leaf=True) == optree.tree_structure(tree, none_is_leaf=True)
    assert list(back) == ["l2", "l1"] and back["l2"][1] is None
    with pytest.raises(ValueError, match=r"missing \['l2\.0'\], unexpected \['x'\]"):
        spec.unflatten({"l1.b.0": b, "l1.w": w, "x": w})


def test_errors_name_the_path():
    w, b = torch.zeros(2, 3, dtype=DT), torch.zeros(2, dtype=DT)
    f = lambda p, x: F.linear(x, p["l1"]["w"], p["l1"]["b"])  # noqa: E731
    x = torch.zeros(4, 3, dtype=DT)
    with pytest.raises(TypeError, match=r"parameter 'l1\.b' \(path \('l1', 'b'\)\) must be a tensor, got float"):
        kf.trace(f, {"l1": {"w": w, "b": 0.0}}, x)
    with pytest.raises(ValueError, match=r"paths \('l1', 'w'\) and \('l1\.w',\) have the same name 'l1\.w'"):
        kf.trace(f, {"l1": {"w": w, "b": b}, "l1.w": w}, x)
    params = {"l1": {"w": w, "b": b}}
    plan = kf.trace(f, params, x)
    cap = kf.capture(f, params, x, torch.zeros(4, 2, dtype=DT), "mse", fisher="exact")
    factors = kf.kronecker_factors(cap)
    with pytest.raises(ValueError, match=r"grads must .* missing \['l1\.b', 'l1\.w'\], unexpected \['0', '1'\]"):
        kf.precondition(params, (cap.grads["l1"]["b"], cap.grads["l1"]["w"]), factors, layers=plan.layers, damping=1.0)
    with pytest.raises(ValueError, match=r"gradient of 'l1\.w' has shape \(3, 2\)"):
        kf.precondition(params, {"l1": {"w": w.T, "b": b}}, factors, layers=plan.layers, damping=1.0)
    with pytest.raises(ValueError, match=r"the plan must .* missing \['l0\.b'\], unexpected \['l1\.b'\]"):
        kf.capture(f, {"l1": {"w": w}, "l0": {"b": b}}, x, torch.zeros(4, 2, dtype=DT), "mse", plan=plan)


@given(rows=st.integers(1, 6), cols=st.integers(1, 5), slice_entries=st.integers(1, 40), seed=st.integers(0, 2**16))
@example(rows=5, cols=3, slice_entries=1, seed=0)  # one row per slice
@example(rows=4, cols=4, slice_entries=10**6, seed=1)  # one slice
def test_inner_is_the_weighted_sum_of_dots_whatever_the_layout(rows, cols, slice_entries, seed):
    """``tree.inner`` sums ``wₙ⟨aₙ, bₙ⟩`` over the weights' names (zero weights skipped, a name list meaning
    weight 1), equal to a float64 reference, strided tensors included; a tensor at an odd offset in memory and its
    fresh copy give the same bits (a BLAS dot's rounding depends on the alignment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tree, "INNER_ENTRIES", slice_entries)
        _check_inner(rows, cols, seed)


def _check_inner(rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = {"m": torch.randn(rows, cols, generator=gen), "v": torch.randn(cols, generator=gen),
         "s": torch.randn((), generator=gen), "t": torch.randn(cols, rows, generator=gen).T}  # "t" strided
    b = {n: torch.randn(t.shape, generator=gen) for n, t in a.items()}
    weights = {"m": 0.5, "v": 0.0, "s": -2.0, "t": 3.0}
    want = sum(w * (a[n].double() * b[n].double()).sum() for n, w in weights.items())
    torch.testing.assert_close(tree.inner(a, b, weights), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tree.inner(a, b, list(a)), sum((a[n].double() * b[n].double()).sum() for n in a),
                               rtol=1e-6, atol=1e-6)
    shifted = torch.empty(a["m"].numel() + 1)[1:].view_as(a["m"]).copy_(a["m"])  # storage offset 1
    assert torch.equal(tree.inner({"m": shifted}, b, ["m"]), tree.inner(a, b, ["m"]))
    assert tree.inner(a, b, {"v": 0.0}).item() == 0.0  # a zero weight is skipped, an empty sum is 0
