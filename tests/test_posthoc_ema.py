"""Post-hoc EMA (EDM2): the sigma_rel <-> gamma conversion, the power-function EMA's weights, the least-squares
reconstruction on a synthetic weight trajectory (tracked profiles come back exactly, untracked ones close to a
directly tracked EMA), snapshots through a fit stopped and resumed, and the tool's exports loading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ldm.cli import LdmCLI, build_cli
from ldm.diffusion.init_weights import load_init_weights
from ldm.diffusion.posthoc_ema import (
    PROFILE_KEY,
    RECONSTRUCTION_KEY,
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_name,
)
from ldm.training.module import write_weights
from tests.stage2 import ROOT, cli_args, write_stage2_shards
from tools.posthoc_ema import main as posthoc_ema_tool

TRACKED = (0.05, 0.10)  # EDM2's pair
UNTRACKED = (0.03, 0.07, 0.15)  # narrower, between and wider
STEPS, EVERY = 600, 30  # the synthetic trajectory: 20 snapshots of each tracked profile


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_gives_edm2s_published_exponents(sigma_rel: float, gamma: float) -> None:
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.005)  # EDM2 Sec. 3.1
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


@pytest.mark.parametrize("sigma_rel", [0.0, 0.29, -0.1])
def test_a_sigma_rel_no_power_profile_has_is_refused(sigma_rel: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        sigma_rel_to_gamma(sigma_rel)


def test_the_power_ema_weighs_each_update_by_the_profiles_mass() -> None:
    """Weights one-hot in the update count: the shadow holds each update's weight, the mass of p_{t,gamma} on
    [tau - 1, tau] = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)."""
    t = 40
    model = nn.Linear(t, 1, bias=False)
    ema = PowerEMA(model, 0.10)
    for tau in range(t):
        with torch.no_grad():
            model.weight.copy_(torch.eye(t)[tau])
        ema.update(model)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    expected = (tau ** (ema.gamma + 1) - (tau - 1) ** (ema.gamma + 1)) / t ** (ema.gamma + 1)
    torch.testing.assert_close(ema.module.weight[0].double(), expected, atol=1e-6, rtol=1e-4)
    assert int(ema.num_updates) == t


def test_profile_inner_products_match_numerical_integration() -> None:
    times, gammas = torch.tensor([300.0, 1000.0]), torch.tensor([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.2)])
    tau = torch.linspace(0, 1000, 2_000_001, dtype=torch.float64)[1:]
    profiles = [torch.where(tau <= t, (g + 1) / t * (tau / t) ** g, 0.0) for t, g in zip(times.double(), gammas.double())]
    for a in range(2):
        for b in range(2):
            numeric = torch.trapezoid(profiles[a] * profiles[b], tau)
            closed = profile_inner_products(times[a], gammas[a], times[b], gammas[b])
            assert closed == pytest.approx(numeric.item(), rel=1e-4), (a, b)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A state dict's tensors as one float64 vector, in the order of their names."""
    return torch.cat([state[k].double().flatten() for k in sorted(state)])


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[float, torch.Tensor]]:
    """A random walk with drift of a small network's weights for STEPS updates: snapshots of the tracked profiles
    every EVERY steps in export form (a folder), and every profile's directly tracked EMA at the end."""
    folder = tmp_path_factory.mktemp("phema")
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    emas = {s: PowerEMA(model, s) for s in TRACKED + UNTRACKED}
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator) + 0.002 * torch.cos(torch.tensor(step / 90)))
        for ema in emas.values():
            ema.update(model)
        for s in TRACKED if step % EVERY == 0 else ():
            state = {f"backbone.{k}": v for k, v in emas[s].module.state_dict().items()}
            profile = {"sigma_rel": s, "updates": int(emas[s].num_updates), "step": step}
            write_weights(state, {"codec": "{}", PROFILE_KEY: json.dumps(profile)}, folder / snapshot_name(s, step))
    return folder, {s: flat(ema.module.state_dict()) for s, ema in emas.items()}


def reconstructed(folder: Path, sigma_rels: tuple[float, ...]) -> list[torch.Tensor]:
    exports = reconstruct(list_snapshots(folder), list(sigma_rels))
    return [flat({k.removeprefix("backbone."): v for k, v in state.items()}) for state, _ in exports]


def test_reconstructing_a_tracked_profile_gives_its_weights(trajectory: tuple) -> None:
    folder, direct = trajectory
    spread = (direct[0.05] - direct[0.10]).norm()  # how far apart the two tracked EMAs are
    for sigma_rel, weights in zip(TRACKED, reconstructed(folder, TRACKED)):
        assert (weights - direct[sigma_rel]).norm() < 1e-6 * spread, sigma_rel


def test_reconstructing_an_untracked_profile_matches_its_directly_tracked_ema(trajectory: tuple) -> None:
    """Within 1% of the distance between the tracked profiles' EMAs (measured: 0.03-0.4%); the nearest tracked
    profile, taken as it is, is over 100 times further off."""
    folder, direct = trajectory
    spread = (direct[0.05] - direct[0.10]).norm()
    for sigma_rel, weights in zip(UNTRACKED, reconstructed(folder, UNTRACKED)):
        error = (weights - direct[sigma_rel]).norm()
        nearest = min((direct[s] - direct[sigma_rel]).norm() for s in TRACKED)
        assert error < 0.01 * spread and error < 0.05 * nearest, (sigma_rel, error / spread, nearest / spread)


# --- through a fit: snapshots survive a stop and resume; the tool's exports load ----------------------------------
CLASS2IMG = ROOT / "experiments" / "shapes" / "class2img_unet.yaml"
TINY_UNET = ROOT / "configs" / "backbone" / "unet-tiny.yaml"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict], dict[str, torch.Tensor], LdmCLI]:
    """The tiny class2img run with snapshots every 2 steps, stopped after step 4 and resumed to step 5: (its folder,
    the snapshot files and the last.ckpt state dict at the stop, the resumed fit's CLI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    part = out.parent / "posthoc.yaml"
    part.write_text(yaml.safe_dump({"model": {"init_args": {"posthoc_ema": {"sigma_rels": list(TRACKED), "every_n_steps": 2}}},
                                    "trainer": {"callbacks": []}}))  # no sampling, no metric weights to look for
    args = [*cli_args(CLASS2IMG, write_stage2_shards(out.parent / "shapes"), out, parts=(str(part),)),
            "--model.init_args.backbone", str(TINY_UNET), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ldm"])  # LightningCLI warns when it sees pytest's argv beside `args`
        build_cli(["fit", *args, "--trainer.max_steps", "4"])
        at_stop = snapshot_files(out), torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        cli = build_cli(["fit", *args, "--trainer.max_steps", "5", "--ckpt_path", str(out / "checkpoints" / "last.ckpt")])
    torch.set_num_threads(threads)
    return out, *at_stop, cli


def snapshot_files(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((out / "checkpoints" / "phema").glob("*.safetensors"))}


def test_snapshots_survive_a_stop_and_resume(resumed: tuple) -> None:
    """Snapshots written before the stop stay; the profiles continue from the checkpoint's state: the step-5 snapshot
    is the checkpointed step-4 EMA updated once, with the decay of update 5, by the step-5 weights."""
    out, before, stopped, _ = resumed
    after = snapshot_files(out)
    assert set(before) == {snapshot_name(s, step) for s in TRACKED for step in (2, 4)}
    assert set(after) == set(before) | {snapshot_name(s, 5) for s in TRACKED}  # the end of the resumed run
    for name, weights in before.items():
        assert all(torch.equal(after[name][k], v) for k, v in weights.items()), name
    final = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for i, s in enumerate(TRACKED):
        at_4, at_5 = before[snapshot_name(s, 4)], after[snapshot_name(s, 5)]
        assert any(k.startswith("conditioner.") for k in at_5)  # the class table trains: a snapshot is an export
        beta = (1 - 1 / 5) ** (sigma_rel_to_gamma(s) + 1)
        for key in (k.removeprefix("backbone.") for k in at_5 if k.startswith("backbone.")):
            assert torch.equal(stopped[f"power_emas.{i}.module.{key}"], at_4[f"backbone.{key}"]), key
            expected = beta * stopped[f"power_emas.{i}.module.{key}"] + (1 - beta) * final[f"backbone.{key}"]
            torch.testing.assert_close(at_5[f"backbone.{key}"], expected, rtol=1e-5, atol=1e-6, msg=key)
    assert [(s.sigma_rel, s.updates, s.step) for s in list_snapshots(out / "checkpoints" / "phema")][-2:] == \
        [(0.05, 5, 5), (0.10, 5, 5)]


def test_the_tool_writes_exports_that_load_as_init_weights(resumed: tuple, tmp_path: Path, capsys) -> None:
    out, *_, cli = resumed
    snapshots = out / "checkpoints" / "phema"
    posthoc_ema_tool([str(snapshots), "--sigma-rels", "0.07", "0.10", "--out", str(tmp_path), "--step", "4"])
    exported = tmp_path / snapshot_name(0.07, 4)
    with safe_open(str(exported), "pt") as f:
        made = json.loads(f.metadata()[RECONSTRUCTION_KEY])
        assert (made["sigma_rel"], made["step"], made["snapshots"]) == (0.07, 4, 4)  # steps 2 and 4 of each profile
        assert json.loads(f.metadata()["codec"]) == cli.model.codec.fingerprint()
    model = cli.model
    load_init_weights(model.backbone, model.conditioner, exported)  # what init_weights and tools/export.py run
    weights = load_file(exported)
    assert all(torch.equal(v, weights[f"backbone.{k}"]) for k, v in model.backbone.state_dict().items())
    tracked, snapshot = load_file(tmp_path / snapshot_name(0.10, 4)), load_file(snapshots / snapshot_name(0.10, 4))
    for k in snapshot:  # a tracked profile comes back as its snapshot (up to float32 rounding)
        torch.testing.assert_close(tracked[k], snapshot[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        posthoc_ema_tool([str(snapshots), "--sigma-rels", "0.07", "--out", str(tmp_path), "--step", "4"])
    assert "exist: export to a new folder" in capsys.readouterr().err
