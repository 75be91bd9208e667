"""Bad input gets a clear error naming the layer or parameter; non-finite values never reach the state."""

from __future__ import annotations

import copy

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.out(self.norm(torch.relu(self.fc(x)))) * self.scale


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in m.named_parameters()}


def test_unsupported_parameters_are_reported_and_passed_through():
    """A free scale matches no rule: reported by name with its reason, gradients correct, identity
    fallback (the LayerNorm is tracked)."""
    torch.manual_seed(0)
    model, x, y = WithNorm(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    params = _params(model)
    plan = kf.trace(model, params, x)
    assert set(plan.layers) == {"fc", "norm", "out"}
    assert plan.untracked == ("scale",) and "mul" in plan.reasons["scale"]
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    ref = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y))(params)
    for n in params:
        torch.testing.assert_close(cap.grads[n], ref[n])
    factors = kf.kronecker_factors(cap)
    out = kf.precondition(params, cap.grads, factors, layers=plan.layers, damping=1e-2)
    for n in plan.untracked:
        assert torch.equal(out[n], cap.grads[n])
    with pytest.warns(UserWarning, match=r"scale.*identity"):
        kf.KFAC(model, lr=0.1).step(x, y)


def test_weight_used_outside_a_layer_call_is_untracked():
    """A weight that is also used elsewhere (here: a penalty-like product) cannot be K-FAC'd: untracked."""
    torch.manual_seed(0)
    w = torch.randn(3, 4)

    def f(p, x):
        return F.linear(x, p["w"]) + (p["w"] ** 2).sum()

    plan = kf.trace(f, {"w": w}, torch.randn(2, 4))
    assert plan.layers == {} and plan.untracked == ("w",)


def test_nonfinite_step_is_skipped_and_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = kf.KFAC(model, loss="cross_entropy", lr=0.1, damping=1e-2, inverse_period=1)  # soft labels below
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.step(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    bad = torch.randn(8, 4)
    bad[2, 1] = float("nan")
    with pytest.warns(UserWarning, match="non-finite.*skipped"):
        opt.step(bad, torch.randint(0, 3, (8,)))
    inf_target = torch.full((8, 3), float("inf"))  # class probabilities
    with pytest.warns(UserWarning, match="skipped"):
        opt.step(torch.randn(8, 4), inf_target)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    after = optree.tree_leaves(opt.state_dict())
    before = optree.tree_leaves(state_before)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_non_finite_step_scale_skips_the_step(fixed):
    """A step scale that returns NaN or ∞ at one step (a user's function) skips that step like a NaN gradient:
    a warning naming the scale, parameters and state as they were; the steps around it train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    bad = {2: float("nan")}
    scale = lambda t: torch.tensor(bad.get(int(t), 0.5), dtype=torch.float64)  # noqa: E731
    opt = kf.KFAC(model, loss="cross_entropy", damping=1e-2, step_scale=scale, **(kf.FIXED_STEP if fixed else {}))
    g = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))  # noqa: E731
    for _ in range(2):
        opt.step(*batch())
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    for value in (float("nan"), float("inf")):
        bad[2] = value
        with pytest.warns(UserWarning, match="step scale at step 2; step skipped"):
            opt.step(*batch())
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    for a, b in zip(optree.tree_leaves(opt.state_dict()), optree.tree_leaves(state_before)):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
    bad.clear()  # step 2 again, now finite: the run goes on
    opt.step(*batch())
    assert not torch.equal(model[0].weight, params_before["0.weight"]) and int(opt.kfac_state.step) == 3


def test_update_average_rejects_nonfinite_batch():
    good = {"l": kf.KroneckerFactors(torch.eye(2)[None], torch.eye(3)[None])}
    state, ok = kf.update_average(kf.init_average(good), good, 0.9)
    assert bool(ok)
    bad = {"l": kf.KroneckerFactors(torch.full((1, 2, 2), float("inf")), torch.eye(3)[None])}
    new, ok = kf.update_average(state, bad, 0.9)
    assert not bool(ok)
    for a, b in zip(optree.tree_leaves(new), optree.tree_leaves(state)):
        assert torch.equal(a, b)


def test_mismatched_input_shape_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"layer '0'.*input of shape \(2, 7\)"):
        kf.capture(model, _params(model), torch.randn(2, 7), torch.zeros(2, dtype=torch.long), "cross_entropy")


def test_mismatched_input_dtype_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"layer '0'.*float64.*float32"):
        kf.trace(model, _params(model), torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "loss, target, match",
    [
        ("mse", torch.zeros(2, 4), "target shape"),
        ("mse", torch.zeros(2, 3, dtype=torch.float64), "target dtype"),
        ("cross_entropy", torch.zeros(3, dtype=torch.long), "class-index targets for logits .* must have shape"),
        ("bce_with_logits", torch.zeros(2, 3, 1), "target shape"),
    ],
)
def test_mismatched_targets(loss, target, match):
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=match):
        kf.capture(model, _params(model), torch.randn(2, 4), target, loss)


def test_unknown_loss_reduction_and_fisher():
    with pytest.raises(ValueError, match="unsupported loss"):
        kf.Loss("hinge")
    with pytest.raises(ValueError, match="unsupported reduction"):
        kf.Loss("mse", reduction="none")
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="unknown Fisher type"):
        kf.capture(model, _params(model), torch.randn(2, 4), torch.zeros(2, 3), "mse", fisher="type3")


def test_precondition_checks_gradients_and_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    params, x = _params(model), torch.randn(6, 4)
    cap = kf.capture(model, params, x, torch.randint(0, 3, (6,)), "cross_entropy", fisher="exact")
    layers = kf.trace(model, params, x).layers
    factors = kf.kronecker_factors(cap)
    wrong = dict(cap.grads, **{"2.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"gradient of '2\.weight' has shape \(3, 4\)"):
        kf.precondition(params, wrong, factors, layers=layers, damping=1e-2)
    with pytest.raises(ValueError, match="missing"):
        kf.precondition(params, {k: v for k, v in cap.grads.items() if k != "0.bias"}, factors, layers=layers, damping=1e-2)
    swapped = dict(factors, **{"0": factors["2"]})
    with pytest.raises(ValueError, match=r"layer '0': factors have shapes"):
        kf.precondition(params, cap.grads, swapped, layers=layers, damping=1e-2)
    with pytest.raises(ValueError, match=r"no factors for layers \['2'\]"):
        kf.precondition(params, cap.grads, {"0": factors["0"]}, layers=layers, damping=1e-2)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        kf.precondition(params, cap.grads, factors, layers=layers, damping=-1.0)
    inv = kf.inverse_factors(factors, 1e-2)
    with pytest.raises(ValueError, match="include their damping"):
        kf.precondition(params, cap.grads, inv, layers=layers, damping=1e-2, mode="factored")


def test_data_dependent_layer_calls_are_detected():
    """Same shapes, different control flow between trace and capture: a clear error, not wrong numbers."""
    w = torch.randn(4, 4)

    def f(p, x):
        h = F.linear(x, p["a.weight"])
        return F.linear(h, p["a.weight"]) if x.sum() > 0 else h

    params = {"a.weight": w}
    x_pos = torch.ones(2, 4)
    kf.trace(f, params, x_pos)
    with pytest.raises(RuntimeError, match="tracked layer calls"):
        kf.capture(f, params, -x_pos, torch.zeros(2, 4), "mse", fisher=None)


def test_model_output_must_name_a_tensor():
    w = {"w": torch.randn(2, 3)}
    with pytest.raises(ValueError, match="without a 'logits' entry: pass output="):
        kf.trace(lambda p, x: {"h": F.linear(x, p["w"])}, w, torch.randn(1, 3))
    with pytest.raises(ValueError, match="picked a NoneType .* not a tensor"):
        kf.trace(lambda p, x: (None, F.linear(x, p["w"])), w, torch.randn(1, 3))
    with pytest.raises(ValueError, match="output='h2': the model's output a dict with keys \\['h'\\] has no such entry"):
        kf.trace(lambda p, x: {"h": F.linear(x, p["w"])}, w, torch.randn(1, 3), output="h2")
    with pytest.raises(TypeError, match=r"parameter '0\.1' .* must be a tensor, got int"):
        kf.trace(lambda p, x: x, [(torch.randn(2), 3)], torch.randn(1, 3))


# ----------------------------------------------------------------------------------------------------
# bad input at step time: an error before anything changes, or torch.optim's own behaviour
# ----------------------------------------------------------------------------------------------------


def _small_opt(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, kf.KFAC(model, **kwargs)


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.kfac_state)


def _unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert (state is None) == (opt.kfac_state is None)
    if state is not None:
        assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(state), optree.tree_leaves(opt.kfac_state)))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
def test_non_finite_group_hyperparameter_is_an_error_before_anything_changes(key, value):
    model, opt = _small_opt()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.step(x, y)
    snap = _snapshot(model, opt)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"{key} is {value}"):
        opt.step(x, y)
    _unchanged(model, opt, snap)


@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
def test_non_finite_lr_at_construction(lr):
    with pytest.raises(ValueError, match="invalid lr"):
        _small_opt(lr=lr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_decomposition_dtype_must_be_float32_or_float64(dtype):
    with pytest.raises(ValueError, match="invalid decomposition_dtype"):
        _small_opt(decomposition_dtype=dtype)


def test_targets_none_is_a_clear_error():
    model, opt = _small_opt()
    snap = _snapshot(model, opt)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        opt.step(torch.randn(8, 4), None)
    _unchanged(model, opt, snap)


def test_a_parameter_that_stops_requiring_grad_is_held_fixed():
    """As in torch.optim: a frozen parameter is neither updated nor given a gradient; the others train."""
    model, opt = _small_opt()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    other = model[2].weight.detach().clone()
    opt.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    assert torch.equal(frozen, before) and frozen.grad is None
    assert not torch.equal(model[2].weight.detach(), other)


# ----------------------------------------------------------------------------------------------------
# models without layers, added groups, meta tensors, integer targets, damping
# ----------------------------------------------------------------------------------------------------


class FreeParameters(nn.Module):
    """A free scale, used elementwise (no layer)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (x * self.w)[:, :3]


@pytest.mark.parametrize("make", [FreeParameters, lambda: nn.PReLU(3)], ids=["free", "prelu"])
@pytest.mark.parametrize("cls", [kf.KFAC, kf.EKFAC])
def test_model_without_a_supported_layer_is_refused_by_name(make, cls):
    """No tracked layer: K-FAC would be plain SGD. The first step refuses it, naming each parameter with its
    reason and the supported layers, and changes nothing; so does the pure optimizer's init."""
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(8, 4 if isinstance(model, FreeParameters) else 3), torch.randint(0, 3, (8,))
    name = next(iter(dict(model.named_parameters())))
    opt = cls(model, lr=0.1)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"no supported layer.*'{name}': used .*linear, conv1d"):
        opt.step(x, y)
    _unchanged(model, opt, snap)
    with pytest.raises(ValueError, match="no supported layer"):
        kf.kfac(model).init(_params(model), x)


def test_add_param_group_trains_the_new_parameters_from_then_on():
    """A group added later is named from the model and optimised from the next step, with its own lr, exactly
    as if it had been in the optimizer, frozen, until then (the K-FAC state already covers it)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    opt = kf.KFAC(model, list(model[2].parameters()), lr=0.1)
    ref = kf.KFAC(twin, [{"params": list(twin[2].parameters())}, {"params": list(twin[0].parameters()), "lr": 0.05}],
                  lr=0.1)
    for p in twin[0].parameters():
        p.requires_grad_(False)
    first = model[0].weight.detach().clone()
    for x, y in batches[:2]:
        opt.step(x, y)
        ref.step(x, y)
    assert torch.equal(model[0].weight, first)
    opt.add_param_group({"params": model[0].parameters(), "lr": 0.05})
    for p in twin[0].parameters():
        p.requires_grad_(True)
    for x, y in batches[2:]:
        opt.step(x, y)
        ref.step(x, y)
    assert not torch.equal(model[0].weight, first) and model[0].weight.grad is not None
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 2


def test_add_param_group_of_a_function_model_is_a_clear_error():
    w = {"w": torch.randn(3, 4)}
    opt = kf.KFAC(lambda p, x: F.linear(x, p["w"]), w)
    with pytest.raises(TypeError, match="function model's parameters are fixed"):
        opt.add_param_group({"params": [torch.zeros(3)]})
    assert len(opt.param_groups) == 1


def test_meta_device_model_is_refused_at_construction():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"'0\.weight'.*'1\.running_mean'.*meta device.*to_empty"):
        kf.KFAC(model)
    with pytest.raises(ValueError, match=r"'w'.*meta device"):
        kf.KFAC(lambda p, x: F.linear(x, p["w"]), {"w": torch.empty(3, 4, device="meta")})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_integer_class_targets_of_any_dtype(dtype):
    """Class indices in any integer dtype give exactly the int64 results (uint8 156 is not ignore_index -100)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 200)
    params, x = _params(model), torch.randn(6, 4)
    top = torch.iinfo(dtype).max if dtype != torch.int32 else 199  # uint8: 255 and 156 ≡ -100 (mod 256)
    y = torch.tensor([min(156, top), 3, 0, min(199, top), 7, 1])
    for fisher in ("exact", "empirical", "mc"):
        got = kf.capture(model, params, x, y.to(dtype), "cross_entropy", fisher=fisher, key=kf.random.key(0))
        want = kf.capture(model, params, x, y, "cross_entropy", fisher=fisher, key=kf.random.key(0))
        for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want)):
            assert torch.equal(a, b)
    model, opt = _small_opt()
    model2, opt2 = _small_opt()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    assert torch.equal(opt.step(x, y.to(dtype)), opt2.step(x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("target", [torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.complex64)])
def test_bool_or_complex_class_targets_name_the_dtype(target):
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=f"class indices.*got {target.dtype}"):
        kf.capture(model, _params(model), torch.randn(2, 4), target, "cross_entropy")


def _factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    params, x = _params(model), torch.randn(6, 4)
    cap = kf.capture(model, params, x, torch.randint(0, 3, (6,)), "cross_entropy", fisher="exact")
    return params, cap.grads, kf.kronecker_factors(cap), kf.trace(model, params, x).layers


BAD = [0.0, -1.0, float("nan"), float("inf")]


@pytest.mark.parametrize("damping", BAD + [torch.tensor(-1.0), torch.tensor(float("nan")), torch.tensor(0.0)])
def test_inverse_factors_needs_finite_positive_damping(damping):
    _, _, factors, _ = _factors()
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0, got (0\.0|-1\.0|nan|inf)"):
        kf.inverse_factors(factors, damping)


@pytest.mark.parametrize("damping", BAD[1:] + [torch.tensor(-1.0), torch.tensor(float("inf")), torch.tensor([0.1, -1])])
@pytest.mark.parametrize("kind", ["kronecker", "eigen", "ekfac"])
def test_precondition_needs_finite_non_negative_damping(damping, kind):
    params, grads, factors, layers = _factors()
    if kind != "kronecker":
        factors = kf.eigendecompose(factors)
    if kind == "ekfac":
        factors = kf.ekfac_factors(factors, {n: torch.ones(kf.factors.factor_dims(f)) for n, f in factors.items()})
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0, got"):
        kf.precondition(params, grads, factors, layers=layers, damping=damping)
    kf.precondition(params, grads, factors, layers=layers, damping=torch.tensor(0.1))  # a good tensor passes


def test_damping_checks_add_no_host_read_to_the_pure_step():
    """The pure optimizer's damping is validated by its options and bounds: its calls skip the tensor check,
    and under vmap (where a tensor cannot be read) a public call with a batched damping still works."""
    params, grads, factors, layers = _factors()
    eigen = kf.eigendecompose(factors)
    lam = torch.tensor([0.1, 0.2])
    batched = torch.func.vmap(lambda d: kf.precondition(params, grads, eigen, layers=layers, damping=d)["0.weight"])(lam)
    for i, d in enumerate(lam):
        torch.testing.assert_close(batched[i], kf.precondition(params, grads, eigen, layers=layers, damping=d)["0.weight"])


def test_deepcopy_of_the_pair_continues_exactly_and_leaves_the_original_alone():
    """deepcopy((model, opt)) is the way to copy a training run: the copy trains its own model, the original
    model and optimizer do not move, and the copy continues exactly as the original does on the same batches.
    deepcopy(opt) alone is a self-contained copy that trains its own hidden copy of the model (opt.model);
    deepcopy(model) alone is a model the original optimizer does not train."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    model, opt = _small_opt(lr=0.1, damping_mode="factored", inverse_period=2)
    opt.step(*batches[0])
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.model is model2
    snap = _snapshot(model, opt)
    for x, y in batches[1:]:
        opt2.step(x, y)
    _unchanged(model, opt, snap)
    for x, y in batches[1:]:
        opt.step(x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(optree.tree_leaves(opt.kfac_state), optree.tree_leaves(opt2.kfac_state)):
        assert torch.equal(a, b)
    alone = copy.deepcopy(opt)
    snap = _snapshot(model, opt)
    alone.step(*batches[0])
    _unchanged(model, opt, snap)
    assert alone.model is not model and not torch.equal(alone.model[0].weight, model[0].weight)
    twin = copy.deepcopy(model)
    opt.step(*batches[0])
    assert torch.equal(twin[0].weight, snap[0][0]) and not torch.equal(model[0].weight, snap[0][0])


def test_the_loss_is_never_guessed():
    """Left out, the loss is the one the targets allow: class indices are cross-entropy's; floating targets (a
    regression, soft labels) are an error that asks for it, as is the ordinary loop, which sees no targets — each
    before anything changes. torch's loss modules name it too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    opt = kf.KFAC(model, lr=0.1)
    opt.step(x, torch.randint(0, 3, (8,)))  # class indices: cross-entropy
    ref = kf.KFAC(copy.deepcopy(model), loss="cross_entropy", lr=0.1)
    assert opt.state_dict()["kfac"]["options"]["loss"] == ref.state_dict()["kfac"]["options"]["loss"]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="fit several losses: name it — loss='mse'"):
        opt.step(x, torch.randn(8, 3))
    loop = kf.KFAC(model, fisher="empirical")
    loop.zero_grad()
    F.mse_loss(model(x), torch.randn(8, 3)).backward()
    with pytest.raises(ValueError, match="the ordinary loop never sees the targets, so the loss must be named"):
        loop.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert kf.KFAC(model, loss=nn.MSELoss(reduction="sum")).step(x, torch.randn(8, 3)) is not None
