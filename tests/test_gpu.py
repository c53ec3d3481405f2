"""CUDA-only checks (skipped cleanly on CPU machines and in CI, which has no GPU)."""

from __future__ import annotations

import pytest
import torch
from test_losses import grads_of, naive_loss, random_case

import dft_peft

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fused_matches_float64(dtype):
    """On CUDA a bf16/fp16 head is projected with fp32 accumulation and output (no fp32 copy of
    the weight); the loss equals the float64 loss of the same low-precision numbers."""
    h, w, labels = random_case(31, 2, 257, 256, 32000, dtype=dtype)
    h = h.detach().cuda().requires_grad_()
    w = w.detach().cuda().requires_grad_()
    labels = labels.cuda()
    got, (gh, gw) = grads_of(lambda: dft_peft.fused_linear_loss(h, w, labels, "dft"), h, w)
    ref, (rh, rw) = grads_of(lambda: naive_loss(h, w, labels, "dft"), h, w)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gh.double(), rh.double(), atol=1e-4, rtol=tol)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-4, rtol=tol)
