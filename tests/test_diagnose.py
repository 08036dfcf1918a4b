"""The locator: blame follows the data (masks are not blamed), stage from what failed, no false positives on real
Hugging Face transformers, and cause/fix rules each proven with the real op producing the failure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.diagnose import _forward_op_of, explain


class Fn(nn.Module):
    """A module around a function, with one parameter ``w`` (so the locator has a model and a parameter to name)."""

    def __init__(self, fn, w) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w).clone())
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.w, *args)


def locate(fn, w, *args, **kwargs):
    m = Fn(fn, w)
    return gg.locate_nonfinite(lambda: m(*args), m, **kwargs), m


# ------------------------------------------------------------------------------------------ blame follows the data
class MaskedAttention(nn.Module):
    """Scaled dot-product attention with an additive mask, written out (softmax over masked scores)."""

    def __init__(self, fill: str = "-inf", poison: str | None = None) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)
        self.fill = fill
        self.poison = poison

    def forward(self, x, pad):  # pad: (batch, seq) bool, True = padding
        scores = self.q(x) @ x.transpose(1, 2)
        value = float("-inf") if self.fill == "-inf" else torch.finfo(scores.dtype).min
        scores = scores.masked_fill(pad[:, None, :], value)
        h = torch.softmax(scores, dim=-1) @ x
        if self.poison == "log":
            h = torch.log(h - h)  # log(0) = -inf: the real failure, after the mask
        elif self.poison == "exp":
            h = torch.exp(h * 1e3)  # overflow: an Inf-only failure, after the mask
        return self.out(h).mean()


def masked_batch():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    return x, pad


@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
def test_masks_are_not_blamed(fill):
    x, pad = masked_batch()
    model = MaskedAttention(fill)
    assert gg.locate_nonfinite(lambda: model(x, pad), model) is None  # a healthy masked step: nothing to report
    model.poison = "log"
    d = gg.locate_nonfinite(lambda: model(x, pad), model)
    assert (d.stage, d.module, d.op, d.value) == ("forward", "", "aten.log.default", "inf"), str(d)
    model.poison = "exp"  # the first Inf of the step is the mask; the failure's Inf is born in exp
    d = gg.locate_nonfinite(lambda: model(x, pad), model)
    assert (d.stage, d.module, d.op, d.value) == ("forward", "", "aten.exp.default", "inf"), str(d)
    assert "overflow" in d.cause


def test_finfo_min_mask_whose_sum_overflows_is_healthy():
    # every element is finite, their float32 sum is -inf: a sum-based check reported aten.full here
    lin = nn.Linear(4, 4)

    def closure():
        mask = torch.full((64, 64), torch.finfo(torch.float32).min)
        assert torch.isinf(mask.sum())
        return (lin(torch.ones(64, 4)).sum(-1, keepdim=True) + mask).softmax(-1).sum()

    assert gg.locate_nonfinite(closure, lin) is None


def test_neg_inf_mask_passed_in_the_batch_is_not_the_input_stage():
    x, pad = masked_batch()
    model = MaskedAttention()
    additive = torch.zeros(2, 1, 5).masked_fill(pad[:, None, :], float("-inf"))  # an -inf mask from the data loader

    def closure(shift):
        scores = model.q(x) @ x.transpose(1, 2) + additive
        h = torch.softmax(scores, -1) @ x
        return model.out(torch.sqrt(h - shift)).mean()  # sqrt of a negative number for shift=10: the real failure

    assert gg.locate_nonfinite(lambda: closure(-10.0), model) is None
    d = gg.locate_nonfinite(lambda: closure(10.0), model)
    assert (d.stage, d.op, d.value) == ("forward", "aten.sqrt.default", "nan"), str(d)
    assert "input batch" not in d.cause


def test_input_stage_names_nan_or_inf():
    lin = nn.Linear(3, 1)
    x = torch.ones(2, 3)
    x[0, 1] = math.nan
    d = gg.locate_nonfinite(lambda: lin(x).sum(), lin)
    assert (d.stage, d.value) == ("input", "nan") and "NaN values" in d.cause
    x[0, 1] = math.inf
    d = gg.locate_nonfinite(lambda: lin(x).sum(), lin)
    assert (d.stage, d.value) == ("input", "inf") and "Inf values" in d.cause


def test_fully_masked_row_blames_softmax_and_says_finfo_min():
    x, pad = masked_batch()
    pad[1, :] = True  # every key of the second sequence masked
    model = MaskedAttention()
    d = gg.locate_nonfinite(lambda: model(x, pad), model)
    assert (d.stage, d.op, d.value) == ("forward", "aten._softmax.default", "nan"), str(d)
    assert "every position" in d.cause and "torch.finfo(dtype).min" in d.fix


def test_inf_that_became_nan_names_where_the_inf_started():
    def manual_softmax(w):
        e = torch.exp(w)  # overflows to inf for w = 100
        return (e / e.sum()).sum()  # inf / inf = NaN: the NaN is made here, the Inf started in exp

    d, _ = locate(manual_softmax, torch.tensor([1.0, 100.0]))
    assert (d.stage, d.op, d.value) == ("forward", "aten.exp.default", "inf"), str(d)
    assert "became NaN in aten.div.Tensor" in d.cause and "subtract the max" in d.fix


# ------------------------------------------------------------------------------------------------------ the stage
def test_discarded_log_branch_of_where_is_a_backward_nan():
    # log(0) = -inf in the untaken branch: the loss is finite, the NaN is born in LogBackward0 (0 / 0)
    d, m = locate(lambda w: torch.where(w > 0, torch.log(w), torch.zeros_like(w)).sum(), [0.0, 2.0])
    assert (d.stage, d.node, d.op, d.value, d.parameters) == ("backward", "LogBackward0", "aten.log", "nan", ("w",))
    assert "torch.where(cond, x, safe)" in d.fix
    assert m.w.grad is None


def test_discarded_exp_overflow_is_a_backward_nan_not_a_forward_inf():
    d, _ = locate(lambda w: torch.where(w < 50, torch.exp(w), torch.zeros_like(w)).sum(), [1.0, 100.0])
    assert (d.stage, d.node, d.op, d.value) == ("backward", "ExpBackward0", "aten.exp", "nan"), str(d)
    assert "did not reach the loss" in d.cause and "double where" in d.fix
    assert "clip" not in d.fix.lower()


def test_nan_discarded_in_forward_reaches_only_the_gradients():
    # sqrt(-1) = NaN in the untaken branch: the loss is finite, SqrtBackward0 divides by that NaN
    d, _ = locate(lambda w: torch.where(w > 0, torch.sqrt(w), torch.zeros_like(w)).sum(), [-1.0, 4.0])
    assert (d.stage, d.node, d.op, d.value) == ("backward", None, "aten.sqrt.default", "nan"), str(d)
    assert "sqrt of a negative number" in d.cause and "the loss never saw it" in d.cause
    assert "double where" in d.fix


def test_an_overflow_inside_batch_norm_is_the_forward_op_not_the_input():
    # native_batch_norm updates its running stats and returns a new output: an overflow made there (a scale of
    # 3e38 times normalised values above 1.2; NaN where the Infs meet) is the forward op's, not "the input batch"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].weight.fill_(3e38)
    d = gg.locate_nonfinite(lambda: model(torch.randn(8, 3)).sum(), model)
    assert (d.stage, d.module, d.value) == ("forward", "1", "nan+inf") and "batch_norm" in d.op, str(d)
    assert "overflow" in d.cause
    # the functional variant declares its in-place writes (running stats) and returns new outputs: both recorded
    torch.manual_seed(0)
    x, mean, var = torch.randn(8, 4), torch.zeros(4), torch.ones(4)
    bn = torch.ops.aten._native_batch_norm_legit.default
    d, _ = locate(lambda w: bn(x, w, None, mean, var, True, 0.1, 1e-5)[0].sum(), torch.full((4,), 3e38))
    assert (d.stage, d.op) == ("forward", "aten._native_batch_norm_legit.default"), str(d)


def test_deliberate_inf_that_reaches_the_loss():
    x, pad = masked_batch()
    model = MaskedAttention()

    def closure():  # logsumexp over a fully masked row is -inf: the mask's own -inf is the failure here
        scores = (model.q(x) @ x.transpose(1, 2)).masked_fill(torch.ones_like(pad)[:, None, :], float("-inf"))
        return torch.logsumexp(scores, -1).mean()

    d = gg.locate_nonfinite(closure, model)
    assert (d.stage, d.op, d.value) == ("forward", "aten.masked_fill.Scalar", "inf"), str(d)
    assert "on purpose" in d.cause and "torch.finfo(dtype).min" in d.fix and "overflow" not in d.cause
    # when an overflow reaches the loss too, the computed Inf is the origin, not the mask that came first
    d = gg.locate_nonfinite(lambda: closure() - torch.exp(model.out.weight.abs().sum() * 1e4), model)
    assert (d.stage, d.op, d.value) == ("forward", "aten.exp.default", "inf"), str(d)


def test_autograd_nodes_map_to_the_exact_aten_op():
    # SoftmaxBackward0 -> aten._softmax: gradients of +-3e38 overflow inside the softmax backward
    c = torch.tensor([-3e38, 3e38])
    d, _ = locate(lambda w: (torch.softmax(w, 0) * c).sum(), [0.0, 2.2])
    assert (d.stage, d.node, d.op, d.value) == ("backward", "SoftmaxBackward0", "aten._softmax", "inf"), str(d)
    # ToCopyBackward0 -> aten._to_copy: a float32 gradient of 1e6 cast back to a float16 weight
    d, _ = locate(lambda w: (w.float() * 1e6).sum(), torch.ones(3, dtype=torch.float16))
    assert (d.stage, d.node, d.op, d.value) == ("backward", "ToCopyBackward0", "aten._to_copy", "inf"), str(d)
    assert "float16" in d.cause and "bfloat16" in d.fix
    # names of nodes never seen created
    assert [_forward_op_of(n) for n in ("SoftmaxBackward0", "ToCopyBackward0", "SqrtBackward0",
                                        "LinalgVectorNormBackward0", "NllLossBackward0", "LogSoftmaxBackward0")] == [
        "aten._softmax", "aten._to_copy", "aten.sqrt", "aten.linalg_vector_norm", "aten.nll_loss_forward",
        "aten._log_softmax"]


# ------------------------------------------------------------------------------------------------ cause/fix rules
def no_clip_advice(fix: str) -> bool:
    return "NormClip" not in fix and "clip gradients" not in fix.lower()


def test_acos_out_of_domain_in_forward():
    d, _ = locate(lambda w: torch.acos(nn.functional.cosine_similarity(w, w * 1.0000001, dim=0) + 1e-6), [1.0, 2.0])
    assert (d.stage, d.op, d.value) == ("forward", "aten.acos.default", "nan"), str(d)
    assert "outside [-1, 1]" in d.cause and "clamp(-1 + eps, 1 - eps)" in d.fix


def test_acos_at_one_has_an_infinite_derivative():
    d, _ = locate(lambda w: torch.acos(w).sum(), [1.0, 0.5])
    assert (d.stage, d.node, d.op, d.value) == ("backward", "AcosBackward0", "aten.acos", "inf"), str(d)
    assert "x = +-1" in d.cause and "at 0" not in d.cause and "clamp(-1 + eps, 1 - eps)" in d.fix


@pytest.mark.parametrize(("fn", "node", "op"), [
    (lambda w: torch.linalg.eigh(w + w.T)[1].abs().sum(), "LinalgEighBackward0", "aten._linalg_eigh"),
    (lambda w: torch.linalg.svd(w)[0].abs().sum(), "LinalgSvdBackward0", "aten._linalg_svd"),
], ids=["eigh", "svd"])
def test_eigh_svd_with_degenerate_eigenvalues(fn, node, op):
    d, _ = locate(fn, torch.eye(3))
    assert (d.stage, d.node, d.op) == ("backward", node, op), str(d)
    assert "degenerate" in d.cause and "jitter" in d.fix and no_clip_advice(d.fix)


def test_std_of_one_sample():
    with pytest.warns(UserWarning):
        d, _ = locate(lambda w, x: (x * w).std(dim=0).sum(), torch.ones(4), torch.ones(1, 4))
    assert (d.stage, d.op, d.value) == ("forward", "aten.std.correction", "nan"), str(d)
    assert "single sample" in d.cause and "correction=0" in d.fix and "drop_last=True" in d.fix


@pytest.mark.parametrize("as_float", [False, True])
def test_division_by_a_count(as_float):
    labels = torch.full((4,), -100)  # a batch where every token is ignored

    def masked_mean(w):
        valid = labels != -100
        count = valid.float().sum() if as_float else valid.sum()
        return (w * valid).sum() / count

    d, _ = locate(masked_mean, torch.ones(4))
    assert (d.stage, d.op, d.value) == ("forward", "aten.div.Tensor", "nan"), str(d)
    assert "count" in d.cause and "clamp_min(1)" in d.fix and "1e-8 to a count" in d.fix


def test_eps_already_in_the_denominator():
    # 1e-8 rounds to 0 in float16: "add eps" is wrong advice, the eps is there
    d, _ = locate(lambda w, y: (w / (y + 1e-8)).float().sum(), torch.ones(2, dtype=torch.float16),
                  torch.zeros(2, dtype=torch.float16))
    assert (d.stage, d.op, d.value) == ("forward", "aten.div.Tensor", "inf"), str(d)
    assert "already adds eps=1e-08" in d.cause and "rounds to 0" in d.cause and "float32" in d.fix
    # the same for a log argument: log(p + 1e-8) of p = 0 in float16 is still log(0)
    d, _ = locate(lambda w: torch.log(w + 1e-8).float().sum(), torch.tensor([0.0, 0.5], dtype=torch.float16))
    assert (d.stage, d.op, d.value) == ("forward", "aten.log.default", "inf"), str(d)
    assert "already adds eps=1e-08" in d.cause and "float32" in d.fix and "add a small eps" not in d.fix
    # and a negative argument: no eps helps
    d, _ = locate(lambda w: torch.sqrt(w + 1e-6).sum(), [-1.0, 4.0])
    assert (d.stage, d.op, d.value) == ("forward", "aten.sqrt.default", "nan"), str(d)
    assert "no eps can fix that" in d.cause and "clamp_min" in d.fix


def test_pow_negative_base_vs_overflow():
    d, _ = locate(lambda w: (w ** 0.5).sum(), [-1.0, 4.0])
    assert (d.op, d.value) == ("aten.pow.Tensor_Scalar", "nan") and "negative base" in d.cause, str(d)
    assert "clamp_min(0)" in d.fix and no_clip_advice(d.fix)
    d, _ = locate(lambda w: (w ** 40.0).sum(), [10.0, 1.0])
    assert (d.op, d.value) == ("aten.pow.Tensor_Scalar", "inf") and "overflow" in d.cause, str(d)
    assert "negative base" not in d.cause


def test_pow_backward_pole_at_zero_vs_growth():
    d, _ = locate(lambda w: (w ** 0.5).sum(), [0.0, 4.0])  # d/dw w^0.5 = 0.5 w^-0.5: infinite at 0
    assert (d.stage, d.node, d.op, d.value) == ("backward", "PowBackward0", "aten.pow", "inf"), str(d)
    assert "infinite at 0" in d.cause and "eps" in d.fix
    d, _ = locate(lambda w: (w ** 2.0).sum() * 3e38, [1.0, 0.1])  # 2 w * 3e38 overflows; no pole anywhere
    assert (d.stage, d.node, d.op, d.value) == ("backward", "PowBackward0", "aten.pow", "inf"), str(d)
    assert "infinite at 0" not in d.cause and "overflow" in d.cause


def test_zero_times_log_zero():
    d, _ = locate(lambda w: -(w * torch.log(w)).sum(), [0.0, 0.5, 0.5])
    assert (d.stage, d.op) == ("forward", "aten.log.default"), str(d)
    assert "0 * log(0)" in d.cause and "torch.xlogy" in d.fix and "kl_div" in d.fix


def test_parameters_non_finite_before_the_step():
    lin = nn.Linear(3, 1)
    with torch.no_grad():
        lin.weight[0, 1] = math.nan  # a corrupt checkpoint
    d = gg.locate_nonfinite(lambda: lin(torch.ones(2, 3)).sum(), lin)
    assert (d.stage, d.parameters, d.value) == ("step", ("weight",), "nan"), str(d)
    assert "already non-finite" in d.cause and "checkpoint" in d.fix and "learning rate" not in d.fix
    # a buffer too: BatchNorm running stats loaded non-finite, used in eval mode
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    model[1].running_mean[0] = math.nan
    d = gg.locate_nonfinite(lambda: model(torch.ones(2, 3)).sum(), model)
    assert (d.stage, d.parameters) == ("step", ("1.running_mean",)) and "already non-finite" in d.cause, str(d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overflow_advice_fits_the_dtype(dtype):
    w = torch.tensor([1.0, 12.0 if dtype == torch.float16 else 100.0], dtype=dtype)  # exp(12) > 65504; exp(100) > 3e38
    d, _ = locate(lambda w: torch.exp(w).float().sum(), w)
    assert (d.stage, d.op, d.value) == ("forward", "aten.exp.default", "inf"), str(d)
    if dtype == torch.float16:
        assert "float16" in d.cause and "bfloat16" in d.fix
    else:
        assert "bfloat16" in d.cause and "float32" in d.fix and "torch.autocast(dtype=torch.bfloat16)" not in d.fix


def test_scaled_overflow_advice_fits_the_dtype():
    # a float16 weight whose float32 gradient, times a GradScaler-like loss scale, overflows when cast back
    d, _ = locate(lambda w: (w.float() * 10.0).sum(), torch.ones(3, dtype=torch.float16), loss_scale=2.0**16)
    assert (d.stage, d.node, d.op, d.value) == ("backward", "ToCopyBackward0", "aten._to_copy", "inf"), str(d)
    assert "loss scaling" in d.cause and "init_scale" in d.fix and "bfloat16 autocast" in d.fix
    fp16 = explain("backward", "aten.mm", "MmBackward0", scaled=True, value="inf", dtype=torch.float16)
    bf16 = explain("backward", "aten.mm", "MmBackward0", scaled=True, value="inf", dtype=torch.bfloat16)
    assert "loss scaling" in fp16[0] and "bfloat16" in fp16[1]
    assert "loss scaling" in bf16[0] and "float32" in bf16[1] and "drop the GradScaler" in bf16[1]
    assert "use bfloat16" not in bf16[1] and "bfloat16 autocast" not in bf16[1]
    # a NaN is never explained as an overflow to clip
    nan = explain("backward", "aten.mul", "MulBackward0", value="nan", dtype=torch.float32)
    assert no_clip_advice(nan[1]) and "overflow" not in nan[0]


def test_unlocated_explanations_do_not_prescribe_clipping_for_a_nan():
    cause, fix = explain("backward")  # the step gate knows only that some gradient is non-finite
    assert "only if it is an overflow" in fix and "gg.locate_nonfinite" in fix
    cause, fix = explain("forward")
    assert "non-finite" in cause and "clip" not in fix


def test_without_a_model_gradients_of_leaves_and_the_root_are_checked_and_kept():
    w = torch.tensor([0.0, 2.0], requires_grad=True)
    w.grad = g = torch.ones(2)
    d = gg.locate_nonfinite(lambda: torch.where(w > 0, torch.log(w), 0.0).sum())
    assert (d.stage, d.node, d.op, d.parameters) == ("backward", "LogBackward0", "aten.log", ("<tensor 0>",)), str(d)
    assert w.grad is g and torch.equal(g, torch.ones(2))
    lin = nn.Linear(2, 1)  # the root module is found by running it; its gradients are left as they were
    lin.weight.grad = g = torch.zeros(1, 2)
    d = gg.locate_nonfinite(lambda: torch.sqrt(lin(torch.zeros(1, 2)) * 0.0).sum())
    assert (d.stage, d.node) == ("backward", "SqrtBackward0") and "bias" in d.parameters, str(d)
    assert lin.weight.grad is g and torch.equal(g, torch.zeros(1, 2)) and lin.bias.grad is None


# -------------------------------------------------------------------------------------------------------- the RNG
def test_replay_restores_the_rng_even_when_the_closure_fails():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    state = torch.get_rng_state()

    def boom():
        model(torch.randn(2, 4))
        raise KeyError("closure failed")

    with pytest.raises(KeyError):
        gg.locate_nonfinite(boom, model)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.ones(2, 4)
    x[0, 0] = math.nan
    assert gg.locate_nonfinite(lambda: model(x).sum(), model).stage == "input"
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------- real Hugging Face transformers
def hf_model(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    v = 64
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=1, eos_token_id=2)
        cls = transformers.GPT2LMHeadModel
    elif name == "bert":
        cfg = transformers.BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16)
        cls = transformers.BertForMaskedLM
    elif name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=64, max_position_embeddings=16)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.T5Config(vocab_size=v, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                    decoder_start_token_id=0)
        cls = transformers.T5ForConditionalGeneration
    cfg._attn_implementation = "eager"  # the masks are built and applied in Python (finfo.min fills)
    return cls(cfg)


def hf_batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 64, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    ids[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


HF = ["gpt2", "bert", "llama", "t5"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", HF)
def test_healthy_transformers_have_no_false_positives(name, autocast):
    model = hf_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt)

    def closure(step):
        ids, mask, labels = hf_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    assert gg.locate_nonfinite(lambda: closure(0), model) is None
    reports = [guard.step(lambda s=s: closure(s)) for s in range(3)]
    assert [r.skipped for r in reports] == [False, False, False]


class Poison(nn.Module):
    """Replaces a transformer MLP activation with one that takes the sqrt of a negative number."""

    def forward(self, x):
        return torch.sqrt(x - 1e3)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "where"), [("gpt2", "transformer.h.1.mlp.act"), ("llama", "model.layers.1.mlp.act_fn"),
                                             ("t5", "decoder.block.1.layer.2.DenseReluDense.act")])
def test_transformer_nan_is_blamed_on_its_op_not_the_masks(name, where, autocast):
    model = hf_model(name)
    parent, attr = where.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, Poison())
    ids, mask, labels = hf_batch(0)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    d = gg.locate_nonfinite(closure, model)
    assert (d.stage, d.module, d.op, d.value) == ("forward", where, "aten.sqrt.default", "nan"), str(d)
    assert "sqrt of a negative number" in d.cause
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.step(closure).skipped
    assert (guard.diagnosis.stage, guard.diagnosis.module, guard.diagnosis.op) == ("forward", where, "aten.sqrt.default")
