"""Speed options without an engine: the fused optimiser against the loop, and the kernels importable
from a plain checkout (PYTHONPATH=.)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from mimae_scale.config import load_config
from mimae_scale.engine.optim import build_optimizer
from mimae_scale.model import build_model
from tests.helpers import REPO

CPU = torch.device("cpu")


def test_fused_adamw_on_cuda_and_its_update_equals_the_loop():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    assert build_optimizer(model, cfg, wrapped_by_deepspeed=True, device=torch.device("cuda")).defaults["fused"]
    plain_opt = build_optimizer(model, cfg, wrapped_by_deepspeed=True, device=CPU)
    assert not plain_opt.defaults["fused"]
    twin = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    twin.load_state_dict(model.state_dict())
    fused_opt = build_optimizer(twin, cfg, wrapped_by_deepspeed=True, device=torch.device("cuda"))  # fused on CPU too
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # one step: the key bias of attention has a zero gradient up to rounding noise, which Adam scales
    # to +-lr, so after a first step's rounding differences a second step's updates there are noise
    for net, opt in ((model, plain_opt), (twin, fused_opt)):
        net(images, generator=torch.Generator().manual_seed(0)).loss.backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_kernels_import_from_a_plain_checkout():
    """`PYTHONPATH=.` with no install of the project: mimae_scale.kernels is the checkout's kernels/."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')];"
        "import mimae_scale.kernels as k, mimae_scale.data_tools as d; print(k.__file__); print(d.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(REPO / "kernels" / "__init__.py"), str(REPO / "data_tools" / "__init__.py")]
