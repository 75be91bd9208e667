"""Checkpoints as torch.optim keeps them: plain data that ``torch.load(..., weights_only=True)`` reads, a bit-exact
resume for every method, and a ``load_state_dict`` that refuses a mismatched checkpoint, naming what differs,
before it changes anything."""

from __future__ import annotations

import copy
import io
import tempfile
from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist
from test_optim import METHOD_CONFIGS
from torch import nn

import kfac_func as kf
import oracles as O
from kfac_func.checkpoint import STATE_OPTIONS, from_plain, to_plain


def _mlp(seed: int = 0, sizes: tuple[int, int, int] = (6, 8, 4), bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2], bias=bias))


def _batches(steps: int, n: int = 16, seed: int = 0, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(steps)]


def _reload(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(..., weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_resumes_bit_identically(kwargs: dict, steps: int, save_after: int) -> kf.KFAC:
    """Save after ``save_after`` steps, keep the original going (the checkpoint must not alias its state),
    reload (``weights_only=True``) into fresh objects with another seed and continue: parameters equal an
    uninterrupted run bit for bit. Returns the resumed optimizer."""
    batches = _batches(steps)
    ref = _mlp()
    ref_opt = kf.KFAC(ref, **kwargs)
    for x, y in batches:
        ref_opt.step(x, y)
    model = _mlp()
    opt = kf.KFAC(model, **kwargs)
    for x, y in batches[:save_after]:
        opt.step(x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in batches[save_after : save_after + 2]:
        opt.step(x, y)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = kf.KFAC(resumed, **kwargs, seed=99)
    resumed_opt.load_state_dict(saved["opt"])
    for x, y in batches[save_after:]:
        resumed_opt.step(x, y)
    for (n, p), q in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert int(resumed_opt.kfac_state.step) == steps
    return resumed_opt


# each method in the fixed step (eigen damping unless named, statistics every step unless given); the adaptive step
# with the quadratic model on the whole batch, eigen damping and statistics every step; and the defaults (the
# adaptive step, L-M and statistics every 5 steps, factored damping)
RESUME_CONFIGS = {
    "kfac_eigen": O.fixed_step(factor_period=2, weight_decay=1e-3),
    "kfac_factored": O.fixed_step(damping_mode="factored", factor_period=2, weight_decay=1e-3),
    # ekfac, two-level nicolaides (additive, factored), spectral (bnn)
    **{name: O.fixed_step(**config) for name, config in METHOD_CONFIGS.items()},
    "two_level_nicolaides_adef2": O.fixed_step(method="two_level", combination="adef2"),
    "adaptive": O.exact_model(adaptive="lr_momentum", damping_adaptation=True, damping_interval=2, reject_steps=True),
    # held sides (blocks of 3 of the first layer's G 8 and A 7, uneven; a diagonal G), both damping modes
    "held_sides_eigen": O.fixed_step(factor_sides={"0": {"G": 3, "A": 3}, "2": {"G": "diagonal"}}),
    "held_sides_ekfac": O.fixed_step(method="ekfac", factor_sides={"0": {"G": 3}, "2": {"A": "identity"}}),
    "held_sides_factored": O.fixed_step(damping_mode="factored", max_factor_dim=4),
    "defaults": {},
}


@pytest.mark.parametrize("config", list(RESUME_CONFIGS))
def test_weights_only_round_trip_resumes_bit_identically(config):
    """Every method's state (factors, decompositions, scalings, coarse spaces and matrices, adapted λ) survives
    ``torch.save`` / ``torch.load(weights_only=True)``, mid inverse period, with MC sampling and momentum."""
    assert_resumes_bit_identically({"lr": 0.05, "damping": 1e-2, "inverse_period": 3, **RESUME_CONFIGS[config]}, 9, 4)


def _plain_types(obj: Any) -> set[type]:
    if isinstance(obj, dict):
        assert all(isinstance(k, (str, int)) for k in obj), list(obj)
        return {dict}.union(*(_plain_types(v) for v in obj.values()))
    if isinstance(obj, list):
        return {list}.union(*(_plain_types(v) for v in obj))
    return {type(obj)}


def test_state_dict_is_plain_data_and_round_trips():
    model = _mlp()
    opt = kf.KFAC(model, method="two_level", coarse_space="spectral", coarse_vectors=2)
    assert _plain_types(opt.state_dict()) <= {dict, list, str, int, float, bool, type(None)}  # before a step
    opt.step(*_batches(1)[0])
    sd = opt.state_dict()
    assert _plain_types(sd) <= {dict, list, str, int, float, bool, type(None), torch.Tensor}
    assert sd["kfac"]["options"]["decomposition_dtype"] == "None"  # float32 where well conditioned
    state = from_plain(to_plain(opt.kfac_state))
    assert optree.tree_structure(state) == optree.tree_structure(opt.kfac_state)
    assert all(a is b for a, b in zip(optree.tree_leaves(state), optree.tree_leaves(opt.kfac_state)))
    fresh = kf.KFAC(_mlp(1), method="two_level", coarse_space="spectral", coarse_vectors=2)
    fresh.load_state_dict(_reload(kf.KFAC(_mlp(1), method="two_level", coarse_space="spectral",
                                          coarse_vectors=2).state_dict()))
    assert fresh.kfac_state is None  # a checkpoint from before the first step holds no state


# ----------------------------------------------------------------------------------------------------
# refused checkpoints: ValueError naming what differs; parameters, groups and state untouched
# ----------------------------------------------------------------------------------------------------


def _checkpoint(**kwargs: Any) -> dict[str, Any]:
    """A weights_only reloaded state_dict of the default MLP after two steps (lr 0.05: not the targets')."""
    opt = kf.KFAC(_mlp(), **{"lr": 0.05, **kwargs})
    for x, y in _batches(2):
        opt.step(x, y)
    return _reload(opt.state_dict())


def _target(model: nn.Module | None = None, classes: int = 4, **kwargs: Any) -> tuple[nn.Module, kf.KFAC]:
    """An optimizer that has taken a step (so it has a state to compare against), with lr 0.1."""
    model = _mlp(5) if model is None else model
    opt = kf.KFAC(model, lr=0.1, **kwargs)
    x, y = _batches(1, seed=3, classes=classes)[0]
    opt.step(x.to(next(model.parameters()).dtype), y)
    return model, opt


def _snapshot(model: nn.Module, opt: kf.KFAC) -> tuple:
    groups = [{k: list(v) if k == "params" else copy.deepcopy(v) for k, v in g.items()} for g in opt.param_groups]
    return ([p.detach().clone() for p in model.parameters()], groups,
            [t.clone() for t in optree.tree_leaves(opt.kfac_state)])


def _assert_unchanged(model: nn.Module, opt: kf.KFAC, snap: tuple) -> None:
    params, groups, state = snap
    now = list(model.parameters())
    assert len(now) == len(params) and all(torch.equal(p, q) for p, q in zip(now, params))
    assert len(opt.param_groups) == len(groups)
    for g, h in zip(opt.param_groups, groups):
        assert g.keys() == h.keys()
        assert all(p is q for p, q in zip(g["params"], h["params"])) and len(g["params"]) == len(h["params"])
        assert all(g[k] == h[k] for k in g if k != "params")
    leaves = optree.tree_leaves(opt.kfac_state)
    assert len(leaves) == len(state) and all(torch.equal(a, b) for a, b in zip(leaves, state))


def _one_process(make: Any, **kwargs: Any) -> Any:
    """``make(**kwargs)`` inside a one-process gloo group (destroyed after)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            return make(**kwargs)
        finally:
            dist.destroy_process_group()


def _tampered(path: tuple[str, ...], value: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    sd = _checkpoint(**kwargs)
    node = sd["kfac"]["state"]
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return sd


def _old_format() -> dict[str, Any]:
    """What the previous format wrote: the state's NamedTuples under "kfac" (read with weights_only=False)."""
    opt = kf.KFAC(_mlp(), lr=0.05)
    opt.step(*_batches(1)[0])
    return {**opt.state_dict(), "kfac": opt.kfac_state._asdict()}


# the method and damping_mode cases differ in that option alone (E-KFAC damps in 'eigen' mode); the state_dtype case
# tampers with an eigenbasis (eigen damping)
REFUSED = {
    "method": (lambda: _checkpoint(damping_mode="eigen"), lambda: _target(method="ekfac"),
               r"method='kfac'.*method='ekfac'"),
    "damping_mode": (lambda: _checkpoint(damping_mode="eigen"), lambda: _target(damping_mode="factored"),
                     r"damping_mode='eigen'.*damping_mode='factored'"),
    "decomposition_dtype": (lambda: _checkpoint(), lambda: _target(decomposition_dtype=torch.float32),
                            r"decomposition_dtype='None'.*'torch.float32'"),
    "max_factor_dim": (lambda: _checkpoint(), lambda: _target(max_factor_dim=4), r"max_factor_dim=2048.*max_factor_dim=4"),
    "adaptive": (lambda: _checkpoint(), lambda: _target(adaptive="lr"), r"adaptive='lr_momentum'.*adaptive='lr'"),
    "fisher": (lambda: _checkpoint(), lambda: _target(fisher="exact"), r"fisher='mc'.*fisher='exact'"),
    "loss": (lambda: _checkpoint(), lambda: _target(loss=kf.Loss("cross_entropy", "sum")),
             r"loss='cross_entropy/mean'.*loss='cross_entropy/sum'"),
    "loss_class_dim": (lambda: _checkpoint(loss=kf.Loss("cross_entropy", class_dim=1)),
                       lambda: _target(loss=kf.Loss("cross_entropy", class_dim=-1)),
                       r"loss='cross_entropy/mean/class_dim=1'.*loss='cross_entropy/mean/class_dim=-1'"),
    "reduce": (lambda: _checkpoint(), lambda: _target(reduce=False), r"reduce='auto'.*reduce=False"),
    "coarse_space": (lambda: _checkpoint(method="two_level"),
                     lambda: _target(method="two_level", coarse_space="spectral"),
                     r"coarse_space='nicolaides'.*coarse_space='spectral'"),
    "coarse_vectors": (lambda: _checkpoint(method="two_level", coarse_space="spectral"),
                       lambda: _target(method="two_level", coarse_space="spectral", coarse_vectors=2),
                       r"coarse_vectors=1.*coarse_vectors=2"),
    "coarse_mode": (lambda: _checkpoint(method="two_level"),
                    lambda: _target(method="two_level", coarse_mode="kronecker"),
                    r"coarse_mode='exact'.*coarse_mode='kronecker'"),
    "combination": (lambda: _checkpoint(method="two_level"), lambda: _target(method="two_level", combination="adef2"),
                    r"combination='additive'.*combination='adef2'"),
    # the per-rank factors of a data-parallel run (one gloo process here) against the global ones
    "lazy_factors": (lambda: _one_process(_checkpoint, data_parallel=True, lazy_factors=True), _target,
                     r"lazy_factors=True.*lazy_factors=False"),
    "factor_sides": (lambda: _checkpoint(), lambda: _target(factor_sides={"0": {"G": 2}}),
                     r"factor_sides=None.*factor_sides=\{'0': \{'G': 2\}\}"),
    "parameter_shapes": (lambda: _checkpoint(), lambda: _target(_mlp(5, (6, 10, 2)), classes=2),  # 92 numbers each
                         r"parameter '0.weight': the checkpoint has \(8, 6\) torch.float32, the model \(10, 6\)"),
    "missing_parameter": (lambda: _checkpoint(), lambda: _target(_mlp(5, bias=False)),
                          r"parameters differ: the checkpoint has '2.bias', the model does not"),
    "parameter_dtype": (lambda: _checkpoint(), lambda: _target(_mlp(5).double()),
                        (r"parameter '0.weight': the checkpoint has \(8, 6\) torch.float32, the model \(8, 6\) "
                         r"torch.float64")),
    "layer_shape": (lambda: _tampered(("factors", "value", "2", "A"), torch.zeros(1, 7, 7)), _target,
                    (r"state.factors.value\['2'\].A \(layer '2'\): the checkpoint has \(1, 7, 7\) torch.float32, "
                     r"this optimizer \(1, 9, 9\) torch.float32")),
    "state_dtype": (lambda: _tampered(("eigen", "0", "QG"), torch.zeros(1, 8, 8, dtype=torch.float64),
                                      damping_mode="eigen"), lambda: _target(damping_mode="eigen"),
                    (r"state.eigen\['0'\].QG \(layer '0'\): the checkpoint has \(1, 8, 8\) torch.float64, "
                     r"this optimizer \(1, 8, 8\) torch.float32")),
    "not_kfac": (lambda: torch.optim.SGD(_mlp().parameters(), lr=0.1).state_dict(), _target, "no 'kfac' entry"),
    "foreign_tag": (lambda: {**_checkpoint(), "kfac": {"format": "other", "state": None}}, _target,
                    "not a kfac_func checkpoint"),
    "version": (lambda: {**(sd := _checkpoint()), "kfac": {**sd["kfac"], "version": 99}}, _target, "version 99"),
    "old_format": (_old_format, _target, "old format"),
    "old_format_before_a_step": (lambda: {**_checkpoint(), "kfac": None}, _target, "old format"),
}


def test_every_state_option_has_a_refusal_case():
    assert set(STATE_OPTIONS) <= set(REFUSED)


@pytest.mark.parametrize("case", list(REFUSED))
def test_mismatched_checkpoint_is_refused_before_anything_changes(case):
    make_checkpoint, make_target, message = REFUSED[case]
    sd = make_checkpoint()
    model, opt = make_target()
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)


def test_layers_are_checked_at_the_first_step_without_a_state():
    """An optimizer that has not stepped has no state to compare layers against: the first step after the load
    compares them against a fresh state, and refuses before changing a parameter."""
    model = _mlp(5)
    opt = kf.KFAC(model, lr=0.1)
    opt.load_state_dict(_tampered(("factors", "value", "0", "G"), torch.zeros(1, 3, 3)))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # and stays refused
        with pytest.raises(ValueError, match=r"value\['0'\].G \(layer '0'\): the checkpoint has \(1, 3, 3\)"):
            opt.step(*_batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.load_state_dict(_checkpoint())  # a good checkpoint replaces it and steps
    opt.step(*_batches(1)[0])
    assert int(opt.kfac_state.step) == 3


def test_layer_names_are_checked():
    sd = _checkpoint()
    value = sd["kfac"]["state"]["factors"]["value"]
    value["fc"] = value.pop("2")
    model, opt = _target()
    snap = _snapshot(model, opt)
    message = r"layers differ: the checkpoint has \['0', 'fc'\], this optimizer \['0', '2'\]"
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)
