"""experiments/testbed_adherence.py: one adherence file per CFG scale; bad scales are refused with the fix."""

from __future__ import annotations

import json

import pytest

from experiments import testbed_adherence


@pytest.mark.parametrize("bad", ["5,x", "0.5"])
def test_bad_guidance_is_refused_with_the_fix(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        testbed_adherence.main(["--out", str(tmp_path), "--device", "cpu", "--guidance", bad])
    assert e.value.code == 2 and "--guidance" in capsys.readouterr().err


def test_one_file_per_guidance_scale(tmp_path):
    testbed_adherence.main(["--out", str(tmp_path), "--device", "cpu", "--point", "quick", "--per-triple", "1",
                            "--steps", "1", "--guidance", "1,3"])
    for g in (1, 3):
        r = json.loads((tmp_path / f"adherence_g{g}.json").read_text())
        assert r["guidance_scale"] == g and r["held_out"]["n"] == r["seen"]["n"] > 0
        assert 0.0 <= r["held_out"]["direction_acc"] <= 1.0
