"""The craft CLI: help reads well; config errors exit 2 naming the key."""

import subprocess
import sys


def craft(*args):
    return subprocess.run([sys.executable, "-m", "craft.cli", *args], capture_output=True, text=True)


def test_help_lists_stages():
    r = craft("--help")
    assert r.returncode == 0
    for cmd in ("data", "validate", "demo", "pipeline", "train", "store"):
        assert cmd in r.stdout


def test_unknown_override_key_exits_2_naming_it():
    r = craft("show-config", "data", "--config", "demo-histo", "nn=3")
    assert r.returncode == 2
    assert "data.nn: unknown key" in r.stderr


def test_wrong_type_exits_2_naming_it():
    r = craft("show-config", "data", "--config", "demo-histo", "n=many")
    assert r.returncode == 2
    assert "data.n: expected an integer" in r.stderr


def test_show_config_resolves_profile_and_override():
    r = craft("show-config", "validate", "--config", "demo-histo", "min_per_class=3")
    assert r.returncode == 0, r.stderr
    assert '"min_per_class": 3' in r.stdout


def test_validate_exit_code_reflects_result(tmp_path):
    """`craft validate` exits 0 on a valid dataset and 1 on an invalid one."""
    from craft.data.demo import DemoConfig, generate

    ds = generate(DemoConfig(modality="cxr", n=32, seed=3), tmp_path / "ds")
    ok = craft("validate", str(ds), "min_per_class=1")
    assert ok.returncode == 0, ok.stderr
    bad = craft("validate", str(ds), "min_per_class=1000")
    assert bad.returncode == 1
    assert "validation failure" in bad.stderr
