"""AlignProp's reward loss scale against the authors' lines, on fixed numbers.

Upstream (`mihirp1998/AlignProp`): the HPS loss is 1 - cos(image, text) (`main.py` line 83 at
commit 7f4503f), averaged over the batch and multiplied by `config.train.loss_coeff` (lines 505-507;
0.01 in every preset of `config/align_prop.py`; `alignprop_trainer.py` lines 330-331 at b22918a).
"""

from __future__ import annotations

import torch

from trainer.algo.alignprop import reward_loss


def test_the_paper_preset_gives_alignprops_hps_gradient():
    """Our hpsv2 score is 100 cos; with weight 0.01 and `alignprop_loss_coeff` 0.01 (the preset's) the
    loss's gradient is upstream's 0.01 x mean(1 - cos); without the coefficient it is 100x that."""
    g = torch.Generator().manual_seed(0)
    cos = (torch.rand(4, generator=g) * 0.4).requires_grad_(True)
    theirs = ((1.0 - cos).sum() / 4) * 0.01  # lines 505-507: sum / batch size, x loss_coeff
    (g_theirs,) = torch.autograd.grad(theirs, cos)
    ours, _ = reward_loss({"hpsv2": 100.0 * cos}, {"hpsv2": 0.01}, loss_coeff=0.01)
    (g_ours,) = torch.autograd.grad(ours, cos)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=0)
    plain, _ = reward_loss({"hpsv2": 100.0 * cos}, {"hpsv2": 0.01})
    (g_plain,) = torch.autograd.grad(plain, cos)
    torch.testing.assert_close(g_plain, 100 * g_theirs, rtol=1e-6, atol=0)
