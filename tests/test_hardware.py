"""The bf16 capability check against the kernel's own CPU flags, and the warning a fit on an emulating CPU gives."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import lightning.pytorch as pl
import pytest
from tiny_helpers import TINY, batches
from torch.utils.data import DataLoader

from lightning_tune import hardware
from lightning_tune.recipes import LoRAFinetune


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file(), reason="reads x86 flags from /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags_the_kernel_reports():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert hardware.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def fit_one_step(precision: str) -> None:
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(batches(1), batch_size=None))


@pytest.mark.parametrize(("native", "precision", "warned"), [(False, "bf16-mixed", True), (True, "bf16-mixed", False), (False, "32-true", False)])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(monkeypatch, caplog, native, precision, warned):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="lightning_tune.hardware"):
        fit_one_step(precision)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_tune.hardware"]
    assert (
        lines
        == [
            f"trainer.precision {precision} on a CPU without native bf16 (no AVX512-BF16/AMX/Arm BF16): bf16 is emulated here and much slower than fp32; use precision 32 / dtype float32 on this machine"
        ]
    ) == warned
    assert bool(lines) == warned


def test_validate_names_bf16_mixed_as_the_fast_choice_on_an_amx_cpu(monkeypatch, capsys, tmp_path) -> None:
    """Issue 37: on a CPU with AMX an fp32 CPU run is told that bf16-mixed is the fast choice; elsewhere nothing is said,
    and bf16 on a CPU that emulates it is warned about."""
    from lightning_tune import hardware
    from lightning_tune.cli import main

    monkeypatch.chdir(tmp_path)
    for amx, native, precision, expected in (
        (True, True, "32", "note: this CPU has AMX"),
        (False, True, "32", None),
        (False, False, "bf16-mixed", "warning: precision bf16-mixed on a CPU without native bf16"),
    ):
        monkeypatch.setattr(hardware, "cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        capsys.readouterr()
        assert main(["validate", "--config", "tiny_lora.yaml", "--trainer.precision", precision]) == 0
        err = capsys.readouterr().err
        assert (expected in err) if expected else ("AMX" not in err and "bf16" not in err), (amx, precision, err)
