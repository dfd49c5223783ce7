"""The float64 fold core against torch's own convolutions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonbn.export import fold_math
from tritonbn.export.fold_module import cast_once


def _bn(x, s, t):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.from_numpy(s).view(shape) + torch.from_numpy(t).view(shape)


def _vec(n, rng, lo=0.5, hi=1.5):
    return rng.uniform(lo, hi, n)


def test_scale_shift_matches_torch_eval_bn():
    bn = torch.nn.BatchNorm2d(4, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    w, b = bn.weight.detach(), bn.bias.detach()
    s, t = fold_math.bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, w, b)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(_bn(x, s, t), bn(x), rtol=0, atol=1e-12)


def test_scale_shift_without_affine():
    s, t = fold_math.bn_scale_shift(np.array([1.0]), np.array([3.0]), 1.0)
    assert s[0] == 0.5 and t[0] == -0.5


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), cin_pg=st.integers(1, 3), cout_pg=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), dims=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_conv_and_conv_transpose_folds_are_exact(groups, cin_pg, cout_pg, k, stride, dims, seed):
    rng = np.random.default_rng(seed)
    cin, cout = groups * cin_pg, groups * cout_pg
    x = torch.randn((2, cin) + (5,) * dims, dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d}[dims]
    convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[dims]
    w = rng.standard_normal((cout, cin_pg) + (k,) * dims)
    b = rng.standard_normal(cout)
    s, t = _vec(cout, rng), rng.standard_normal(cout)
    w2, b2 = fold_math.fold_after(w, b, s, t, "conv", groups)
    ref = _bn(conv(x, torch.from_numpy(w), torch.from_numpy(b), stride=stride, groups=groups), s, t)
    got = conv(x, torch.from_numpy(w2), torch.from_numpy(b2), stride=stride, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # BN before the conv (no padding): folds into the input channels
    si, ti = _vec(cin, rng), rng.standard_normal(cin)
    w3, b3 = fold_math.fold_before(w, None, si, ti, "conv", groups)
    ref = conv(_bn(x, si, ti), torch.from_numpy(w), stride=stride, groups=groups)
    got = conv(x, torch.from_numpy(w3), torch.from_numpy(b3), stride=stride, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # ConvTranspose weight [Cin, Cout/g, k...]
    wt = rng.standard_normal((cin, cout_pg) + (k,) * dims)
    w4, b4 = fold_math.fold_after(wt, None, s, t, "conv_transpose", groups)
    ref = _bn(convt(x, torch.from_numpy(wt), stride=stride, groups=groups), s, t)
    got = convt(x, torch.from_numpy(w4), torch.from_numpy(b4), stride=stride, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_conv_transpose_with_cin_equal_cout_scales_the_output_axis():
    # Inductor's bug: scaling axis 0 of a ConvTranspose weight is wrong even when shapes agree.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 3, 3))
    s, t = _vec(4, rng), np.zeros(4)
    w2, _ = fold_math.fold_after(w, None, s, t, "conv_transpose", 1)
    np.testing.assert_allclose(w2, w * s[None, :, None, None])


def test_linear_both_directions():
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    x = rng.standard_normal((4, 5))
    s, t = _vec(3, rng), rng.standard_normal(3)
    w2, b2 = fold_math.fold_after(w, b, s, t)
    np.testing.assert_allclose(x @ w2.T + b2, (x @ w.T + b) * s + t, rtol=1e-12)
    si, ti = _vec(5, rng), rng.standard_normal(5)
    w3, b3 = fold_math.fold_before(w, b, si, ti)
    np.testing.assert_allclose(x @ w3.T + b3, (x * si + ti) @ w.T + b, rtol=1e-12)


def test_channel_mismatch_and_bad_groups_raise():
    with pytest.raises(ValueError):
        fold_math.fold_after(np.zeros((4, 2, 1)), None, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError):
        fold_math.fold_after(np.zeros((4, 2, 1)), None, np.ones(4), np.zeros(4), groups=3)


def test_fp16_fold_is_the_float64_fold_rounded_once():
    rng = np.random.default_rng(3)
    w16 = torch.from_numpy(rng.standard_normal((8, 4, 3, 3)).astype(np.float16))
    s, t = rng.uniform(0.1, 7, 8), rng.standard_normal(8)
    w64, _ = fold_math.fold_after(w16.double().numpy(), None, s, t)
    got = cast_once(w64, w16)
    assert got.dtype == torch.float16
    assert np.array_equal(got.numpy(), w64.astype(np.float16))
    # folding step by step in fp16 would differ somewhere
    naive = (w16 * torch.from_numpy(s.astype(np.float16)).view(-1, 1, 1, 1)).numpy()
    assert not np.array_equal(naive, got.numpy())
