"""The sd-hina command line."""

from __future__ import annotations

import subprocess
import sys

from support import PRESETS

from sd_hina_plugin import cli, registry


def test_list_and_show(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in registry.specs():
        assert spec.name in out
        assert cli.main(["show", spec.name]) == 0
        shown = capsys.readouterr().out
        for field in spec.config.field_specs():
            assert f"  {field.name} ({field.kind})" in shown and field.help in shown
    assert cli.main(["show", "NoSuchThing"]) == 2


def test_validate_presets_and_bad_files(tmp_path, capsys):
    assert cli.main(["validate", *map(str, PRESETS)]) == 0
    bad = tmp_path / "user.toml"
    bad.write_text('[optimizer]\noptimizer_type = "HinaAdamWCore"\n'
                   'optimizer_args = ["weight_decay=-1", "betas=0.9", "low_precision_update=kahan", "lrr=1"]\n')
    assert cli.main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "dotted form" in out and "quote strings" in out
    assert "unknown argument 'lrr'" in out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "sd_hina_plugin.cli", "list"], capture_output=True, text=True, check=True)
    assert "HinaAdamWCore" in result.stdout


def test_show_lists_the_common_arguments_first_and_survives_a_closed_pipe(capsys):
    assert cli.main(["show", "Automagic_CameAMP"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert names[:3] == ["lr", "betas", "weight_decay"], names[:5]
    script = "import sys; from sd_hina_plugin import cli; sys.exit(cli.main(['show', 'HinaAdamWOptimizer']))"
    shown = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True, text=True)
    assert "BrokenPipeError" not in shown.stderr and shown.stdout.startswith("HinaAdamWOptimizer")


def test_other_libraries_names_point_to_ours(capsys):
    assert cli.main(["show", "AdamW8bit"]) == 2
    err = capsys.readouterr().err
    assert "HinaAdamWCore with optim_bits=8" in err and "did you mean 'HinaAdamW'" not in err


def test_validate_says_how_to_write_a_boolean(tmp_path, capsys):
    path = tmp_path / "user.toml"
    path.write_text('optimizer_type = "sd_hina_plugin.HinaAdamWOptimizer"\noptimizer_args = ["use_spd=true"]\n')
    assert cli.main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "write booleans as True/False (use_spd=True)" in out and "quote" not in out
