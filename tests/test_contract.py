"""`buf breaking` against the committed baseline (protos/baseline.binpb):
the working contract passes, and a change that would break callers fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUF = REPO / "node_modules" / ".bin" / "buf"
BASELINE = REPO / "protos" / "baseline.binpb"


def breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUF, "breaking", workspace, "--against", BASELINE],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_contract_is_compatible_with_the_baseline():
    result = breaking(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_renumbering_a_field_is_caught(tmp_path):
    shutil.copy(REPO / "buf.yaml", tmp_path)
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    event = tmp_path / "protos" / "orderstream" / "events" / "v1" / "event.proto"
    text = event.read_text()
    assert "string subject = 4;" in text
    event.write_text(text.replace("string subject = 4;", "string subject = 40;"))
    result = breaking(tmp_path)
    assert result.returncode != 0
    assert "orderstream/events/v1/event.proto" in result.stdout
    assert "subject" in result.stdout
