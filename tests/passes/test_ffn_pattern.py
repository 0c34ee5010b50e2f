"""The FFN fusion pass (``moe_fusion/passes/ffn.py``): matcher tests on ``make_fx`` graphs with
inductor's decompositions (every form, every look-alike that must stay unfused, with the
refusal reason), then end-to-end ``torch.compile`` with ``moe_fusion.backend`` (eager compiler,
one real inductor case, one ``dynamic=True`` case).

Tolerances. fp32: the fused graph runs the same fp32 matmuls and activation as the unfused one,
only the summation order may differ: ``rtol = atol = 1e-5`` (K <= 64 terms of O(1) size).
fp16/bf16: npu_ffn keeps ``h = x @ W1 + b1`` in fp32 where the unfused graph rounds it (see the
module docstring of the pass); against an fp64 reference, the fused mean error must be no larger
than the unfused graph's own (10 % slack) and its max error at most one output ulp larger (an
element may round to the neighbouring value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from moe_fusion.passes import FusionReport, backend
from pass_helpers import calls, fuse, refusals

aten = torch.ops.aten
NPU_FFN = torch.ops.moe_fusion.npu_ffn
MM = (aten.mm, aten.addmm)
M, K, N = 6, 8, 16

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    "fastgelu": lambda h: h * torch.sigmoid(1.702 * h),
}
GLU = {"relu": "reglu", "gelu": "geglu", "silu": "swiglu"}


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def ffn_node(gm):
    (node,) = calls(gm, NPU_FFN)
    return node


def assert_fused(fn, args, activation, target="portable", rtol=1e-5, atol=1e-5):
    """``fn`` becomes one npu_ffn with ``activation`` and no matmul left; same values."""
    gm, report = fuse(fn, *args, passes=["ffn"], target=target)
    node = ffn_node(gm)
    assert node.args[3] == activation
    assert not calls(gm, *MM), gm.graph
    assert len(report.fused("ffn")) == 1 and not report.refused("ffn")
    torch.testing.assert_close(gm(*args), fn(*args), rtol=rtol, atol=atol)
    return gm, node


def assert_refused(fn, args, reason, target="portable"):
    gm, report = fuse(fn, *args, passes=["ffn"], target=target)
    assert not calls(gm, NPU_FFN), gm.graph
    assert any(reason in r for r in refusals(report, "ffn")), refusals(report, "ffn")


# -- plain forms ---------------------------------------------------------------------------------

def linear_bias(act):
    return lambda x, w1, b1, w2, b2: F.linear(act(F.linear(x, w1, b1)), w2, b2), (randn(M, K), randn(N, K), randn(N),
                                                                                  randn(K, N), randn(K))


def linear_no_bias_3d(act):
    return lambda x, w1, w2: F.linear(act(F.linear(x, w1)), w2), (randn(2, 3, K), randn(N, K), randn(K, N))


def matmul_3d(act):
    return lambda x, w1, w2: act(x @ w1) @ w2, (randn(2, 3, K), randn(K, N), randn(N, K))


def matmul_add_bias(act):
    fn = lambda x, w1, b1, w2, b2: act(x @ w1 + b1) @ w2 + b2      # noqa: E731
    return fn, (randn(M, K), randn(K, N), randn(N), randn(N, K), randn(K))


def matmul_add_bias_3d(act):
    # The second bias follows a view back to 3-D: it is the fused op's bias2, its result viewed back.
    return lambda x, w1, b1, w2, b2: act(x @ w1 + b1) @ w2 + b2, (randn(2, 3, K), randn(K, N), randn(N), randn(N, K),
                                                                  randn(K))


@pytest.mark.parametrize("form", [linear_bias, linear_no_bias_3d, matmul_3d, matmul_add_bias, matmul_add_bias_3d])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_plain_forms_fuse(form, activation):
    fn, args = form(ACTIVATIONS[activation])
    _, node = assert_fused(fn, args, activation)
    has_bias = form in (linear_bias, matmul_add_bias, matmul_add_bias_3d)
    assert ("bias1" in node.kwargs) == has_bias
    assert ("bias2" in node.kwargs) == has_bias
    assert node.kwargs["inner_precise"] == 0


def test_erf_gelu_is_refused():
    fn, args = linear_bias(F.gelu)
    assert_refused(fn, args, "exact erf form")


def test_hidden_with_other_users_is_refused():
    def fn(x, w1, w2):
        h = x @ w1
        return torch.relu(h) @ w2, h
    assert_refused(fn, (randn(M, K), randn(K, N), randn(N, K)), "is also used by")


def test_activation_with_other_users_is_refused():
    def fn(x, w1, w2):
        a = F.silu(x @ w1)
        return a @ w2, a.sum()
    assert_refused(fn, (randn(M, K), randn(K, N), randn(N, K)), "is also used by")


def test_chained_ffns_fuse_the_first_pair_only():
    def fn(x, w1, w2, w3):
        return torch.relu(torch.relu(x @ w1) @ w2) @ w3
    args = (randn(M, K), randn(K, N), randn(N, K), randn(K, N))
    gm, report = fuse(fn, *args, passes=["ffn"])
    assert len(calls(gm, NPU_FFN)) == 1 and len(calls(gm, aten.mm)) == 1
    assert any("shares nodes" in r for r in refusals(report, "ffn"))
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-5, atol=1e-5)


# -- GLU ---------------------------------------------------------------------------------------

GLU_ORDERS = {
    "a*f(b)": lambda a, b, f: a * f(b),
    "f(b)*a": lambda a, b, f: f(b) * a,
    "f(a)*b": lambda a, b, f: f(a) * b,
}


def chunk_glu(act, order):
    def fn(x, w1, w2):
        return GLU_ORDERS[order](*(x @ w1).chunk(2, -1), act) @ w2
    return fn, (randn(M, K), randn(K, 2 * N), randn(N, K))


@pytest.mark.parametrize("order", ["a*f(b)", "f(b)*a", "f(a)*b"])
@pytest.mark.parametrize("activation", sorted(GLU))
def test_chunk_glu_fuses(activation, order):
    fn, args = chunk_glu(ACTIVATIONS[activation], order)
    gm, node = assert_fused(fn, args, GLU[activation])
    if order == "f(a)*b":
        # npu_ffn computes left * f(right): the activated first chunk becomes the right half.
        assert node.args[1].target is aten.cat.default
    else:
        assert node.args[1].op == "placeholder"      # W1 unchanged


@pytest.mark.parametrize("gate_first", [True, False])
def test_separate_gate_up_glu_fuses(gate_first):
    def fn(x, wg, bg, wu, bu, wd):
        gate, up = F.silu(F.linear(x, wg, bg)), F.linear(x, wu, bu)
        return F.linear(gate * up if gate_first else up * gate, wd)
    args = (randn(2, 3, K), randn(N, K), randn(N), randn(N, K), randn(N), randn(K, N))
    gm, node = assert_fused(fn, args, "swiglu")
    # W1 = cat([Wu, Wg]) of the stored (N, K) weights, transposed as a view: the non-activated (up)
    # projection is the left half of W1, and the copy is of whole rows.
    w1 = node.args[1]
    assert w1.target is aten.permute.default and list(w1.args[1]) == [1, 0]
    cat = w1.args[0]
    assert cat.target is aten.cat.default and cat.args[1] == -2
    assert [part.name for part in cat.args[0]] == ["wu_1", "wg_1"]
    assert node.kwargs["bias1"].target is aten.cat.default


def halves(x, w1):
    return (x @ w1).chunk(2, -1)


def megatron_glu(offset):
    """Megatron-core's MLP GLU: ``act(x_glu) * (x_linear + config.glu_linear_offset)``."""
    def fn(x, w1, w2):
        x_glu, x_linear = halves(x, w1)
        return (F.silu(x_glu) * (x_linear + offset)) @ w2
    return fn, (randn(M, K), randn(K, 2 * N), randn(N, K))


def test_megatron_glu_with_its_default_zero_offset_fuses():
    gm, _ = assert_fused(*megatron_glu(0.0), "swiglu")
    assert not calls(gm, aten.add.Tensor)


def test_megatron_glu_with_an_offset_is_refused():
    assert_refused(*megatron_glu(1.0), "the GLU's linear half adds an offset (1.0, Megatron's glu_linear_offset)")


@pytest.mark.parametrize("fn, reason", [
    (lambda x, w1, w2: (F.silu(halves(x, w1)[0]) * F.silu(halves(x, w1)[1])) @ w2, "both factors"),
    (lambda x, w1, w2: (F.gelu(halves(x, w1)[1]) * halves(x, w1)[0]) @ w2, "exact erf form"),
    (lambda x, w1, w2: (ACTIVATIONS["fastgelu"](halves(x, w1)[1]) * halves(x, w1)[0]) @ w2, "no GLU form of fastgelu"),
], ids=["both-activated", "erf-geglu", "fastgelu-glu"])
def test_glu_look_alikes_are_refused(fn, reason):
    assert_refused(fn, (randn(M, K), randn(K, 2 * N), randn(N, K)), reason)


def test_same_half_twice_is_an_exact_glu():
    # a * f(a) is left * f(right) with both halves reading W1[:, :N]: W1 becomes cat([W, W]) columns.
    fn = lambda x, w1, w2: (halves(x, w1)[0] * F.silu(halves(x, w1)[0])) @ w2      # noqa: E731
    assert_fused(fn, (randn(M, K), randn(K, 2 * N), randn(N, K)), "swiglu")


@pytest.mark.parametrize("fn, w1_cols", [
    # (M, 1) * f((M, N)) broadcasts: not an elementwise product of two halves.
    (lambda x, w1, w2: ((x @ w1).split([1, N], -1)[0] * F.silu((x @ w1).split([1, N], -1)[1])) @ w2, N + 1),
    # A chunk of rows pairs different tokens: not a GLU either.
    (lambda x, w1, w2: torch.cat([(lambda a, b: a * F.silu(b))(*(x @ w1).chunk(2, 0))] * 2) @ w2, N),
], ids=["broadcast", "row-chunk"])
def test_products_that_are_not_glu_stay_unfused(fn, w1_cols):
    gm, _ = fuse(fn, randn(M, K), randn(K, w1_cols), randn(N, K), passes=["ffn"])
    assert not calls(gm, NPU_FFN)


def test_glu_from_different_inputs_is_refused():
    def fn(x, y, wg, wu, w2):
        return (F.silu(x @ wg) * (y @ wu)) @ w2
    assert_refused(fn, (randn(M, K), randn(M, K), randn(K, N), randn(K, N), randn(N, K)), "different inputs")


def test_glu_with_one_biased_projection_is_refused():
    def fn(x, wg, bg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu), wd)
    assert_refused(fn, (randn(M, K), randn(N, K), randn(N), randn(N, K), randn(K, N)), "only one of the gate/up")


# -- per-expert segments -------------------------------------------------------------------------

def test_experts_with_indexed_weights_fuse_without_stacks():
    def fn(x, w1, w2):
        return torch.cat([torch.relu(x[s:t] @ w1[e]) @ w2[e] for e, (s, t) in enumerate([(0, 3), (3, 5), (5, 9)])])
    gm, node = assert_fused(fn, (randn(9, K), randn(3, K, N), randn(3, N, K)), "relu")
    assert node.kwargs["expert_tokens"] == [3, 2, 4]
    assert node.args[1].op == "placeholder" and node.args[2].op == "placeholder"
    assert not calls(gm, aten.stack, aten.cat, aten.slice)


def test_experts_with_separate_weights_and_biases_fuse():
    def fn(x, *params):
        rows = [(0, 4), (4, 4), (4, 10)]
        return torch.cat([F.linear(F.silu(F.linear(x[s:t], *params[4 * e:4 * e + 2])), *params[4 * e + 2:4 * e + 4])
                          for e, (s, t) in enumerate(rows)])
    params = [t for _ in range(3) for t in (randn(N, K), randn(N), randn(K, N), randn(K))]
    gm, node = assert_fused(fn, (randn(10, K), *params), "silu")
    # The decomposed cat drops the empty expert's (0, K) output: two experts remain.
    assert node.kwargs["expert_tokens"] == [4, 6]
    # W1, W2, b1, b2 each stacked over the two experts as a cat of unsqueezed parts.
    assert len(calls(gm, aten.cat)) == 4 and not calls(gm, aten.stack)


def test_experts_over_part_of_the_rows_slice_the_input():
    def fn(x, w1, w2):
        return torch.cat([F.silu(x[2:4] @ w1[0]) @ w2[0], F.silu(x[4:-1] @ w1[1]) @ w2[1]])
    gm, node = assert_fused(fn, (randn(9, K), randn(2, K, N), randn(2, N, K)), "silu")
    assert node.kwargs["expert_tokens"] == [2, 4]
    assert node.args[0].target is aten.slice.Tensor


@pytest.mark.parametrize("rows, reason", [([(0, 4), (3, 9)], "overlap"), ([(0, 3), (4, 9)], "leave a gap")])
def test_bad_expert_segments_fuse_each_expert_alone(rows, reason):
    def fn(x, w1, w2):
        return torch.cat([torch.relu(x[s:t] @ w1[e]) @ w2[e] for e, (s, t) in enumerate(rows)])
    args = (randn(9, K), randn(2, K, N), randn(2, N, K))
    gm, report = fuse(fn, *args, passes=["ffn"])
    assert any(reason in r for r in refusals(report, "ffn"))
    ffns = calls(gm, NPU_FFN)
    assert len(ffns) == 2 and all("expert_tokens" not in n.kwargs for n in ffns)
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-5, atol=1e-5)


def test_experts_with_different_activations_are_refused_as_a_group():
    def fn(x, w1, w2):
        return torch.cat([torch.relu(x[:3] @ w1[0]) @ w2[0], F.silu(x[3:] @ w1[1]) @ w2[1]])
    gm, report = fuse(fn, randn(9, K), randn(2, K, N), randn(2, N, K), passes=["ffn"])
    assert any("experts differ" in r for r in refusals(report, "ffn"))
    assert len(calls(gm, NPU_FFN)) == 2


def test_experts_over_different_tensors_are_refused_as_a_group():
    def fn(x, y, w1, w2):
        return torch.cat([torch.relu(x @ w1[0]) @ w2[0], torch.relu(y @ w1[1]) @ w2[1]])
    gm, report = fuse(fn, randn(4, K), randn(5, K), randn(2, K, N), randn(2, N, K), passes=["ffn"])
    assert any("static row slices of one 2-D tensor" in r for r in refusals(report, "ffn"))
    assert len(calls(gm, NPU_FFN)) == 2


# -- device targets ----------------------------------------------------------------------------

def test_a3_refuses_fp32():
    fn, args = linear_bias(F.silu)
    assert_refused(fn, args, "x dtype must be one of (float16, bfloat16, int8)", target="A3")


def test_a3_refuses_n2_different_from_k1():
    fn = lambda x, w1, w2: F.silu(x @ w1) @ w2       # noqa: E731
    args = (randn(M, K, dtype=torch.float16), randn(K, N, dtype=torch.float16), randn(N, K + 2, dtype=torch.float16))
    assert_refused(fn, args, "N2 == K1", target="A3")
    assert_fused(fn, (args[0].float(), args[1].float(), args[2].float()), "silu")   # portable allows it


def test_a3_fuses_bf16_with_fp32_biases():
    fn, args = linear_bias(ACTIVATIONS["gelu"])
    args = tuple(a.bfloat16() for a in args)
    gm, report = fuse(fn, *args, passes=["ffn"], target="A3")
    node = ffn_node(gm)
    assert node.kwargs["bias1"].meta["val"].dtype == torch.float32 and node.kwargs["inner_precise"] == 0


def test_a3_glu_needs_fp16():
    fn, args = chunk_glu(F.silu, "a*f(b)")
    assert_refused(fn, tuple(a.bfloat16() for a in args), "swiglu needs fp16 x", target="A3")
    gm, _ = fuse(fn, *(a.half() for a in args), passes=["ffn"], target="A3")
    assert ffn_node(gm).kwargs["inner_precise"] == 1


# -- low precision -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["silu", "gelu", "swiglu"])
def test_low_precision_error_is_no_larger_than_unfused(dtype, form):
    torch.manual_seed(0)
    if form == "swiglu":
        fn, args = chunk_glu(F.silu, "f(b)*a")
        args = (randn(64, 32), randn(32, 128) / 32 ** 0.5, randn(64, 32) / 8)
    else:
        fn = lambda x, w1, b1, w2, b2: F.linear(ACTIVATIONS[form](F.linear(x, w1, b1)), w2, b2)   # noqa: E731
        args = (randn(64, 32), randn(128, 32) / 32 ** 0.5, randn(128) / 4, randn(32, 128) / 128 ** 0.5, randn(32) / 4)
    low = tuple(a.to(dtype) for a in args)
    gm, _ = fuse(fn, *low, passes=["ffn"], target="portable")
    ffn_node(gm)
    reference = fn(*(a.double() for a in low))
    fused_error = (gm(*low).double() - reference).abs()
    unfused_error = (fn(*low).double() - reference).abs()
    assert fused_error.mean() <= 1.1 * unfused_error.mean(), (fused_error.mean(), unfused_error.mean())
    # Elementwise, the two may round a value to neighbouring output values: one output ulp apart.
    ulp = torch.finfo(dtype).eps * reference.abs().max()
    assert fused_error.max() <= unfused_error.max() + ulp, (fused_error.max(), unfused_error.max())


# -- end to end ----------------------------------------------------------------------------------

class Mlp(torch.nn.Module):
    def __init__(self, hidden=K, inner=N):
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, inner), torch.nn.Linear(inner, hidden)
        self.act = torch.nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class SwiGlu(torch.nn.Module):
    def __init__(self, hidden=K, inner=N):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, inner, bias=False)
        self.up = torch.nn.Linear(hidden, inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def compile_and_run(model, *inputs, compiler="eager", dynamic=False):
    torch._dynamo.reset()
    report = FusionReport()
    compiled = torch.compile(model, backend=backend("portable", ["ffn"], report, compiler=compiler), dynamic=dynamic)
    with torch.no_grad():
        return [compiled(x) for x in inputs], report


def test_compiled_mlp_module_matches_eager():
    torch.manual_seed(0)
    model, x = Mlp(), randn(2, 5, K)
    (out,), report = compile_and_run(model, x)
    assert report.ops_after["moe_fusion.npu_ffn.default"] == 1 and report.ops_after["aten.addmm.default"] == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compiled_experts_module_matches_eager(compiler):
    torch.manual_seed(0)
    experts = torch.nn.ModuleList([Mlp() for _ in range(3)])

    # (Not a 1-row segment: inductor decomposes a 1-row mm with N, K <= 16 into mul + sum on CPU.)
    def layer(x):
        return torch.cat([experts[e](x[s:t]) for e, (s, t) in enumerate([(0, 2), (2, 7), (7, 10)])])
    x = randn(10, K)
    (out,), report = compile_and_run(layer, x, compiler=compiler)
    # The experts' output cat is gone; the 4 cats left stack W1, W2, b1, b2 over the experts.
    assert report.ops_after["moe_fusion.npu_ffn.default"] == 1 and report.ops_after["aten.cat.default"] == 4
    assert report.ops_after["aten.mm.default"] + report.ops_after["aten.addmm.default"] == 0
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_inductor_swiglu_matches_eager():
    torch.manual_seed(0)
    model, x = SwiGlu(), randn(2, 5, K)
    (out,), report = compile_and_run(model, x, compiler="inductor")
    assert report.fused("ffn") and report.ops_after["moe_fusion.npu_ffn.default"] == 1
    assert report.ops_after["aten.mm.default"] == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_dynamic_shapes_compile_correctly():
    torch.manual_seed(0)
    model = SwiGlu()
    inputs = [randn(2, 5, K), randn(3, 7, K)]
    outs, report = compile_and_run(model, *inputs, dynamic=True)
    with torch.no_grad():
        for out, x in zip(outs, inputs):
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert report.fused("ffn")
