"""The sd-hina command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


def _validate(tmp_path, capsys, text, *extra):
    path = tmp_path / "user.toml"
    path.write_text(text)
    status = cli.main(["validate", str(path), *extra])
    return status, capsys.readouterr().out


def test_validate_resolves_the_optimizer_type_as_kohya_does(tmp_path, capsys):
    """kohya imports the module and looks the class up with getattr: the name's case must be exact."""
    status, out = _validate(tmp_path, capsys, 'optimizer_type = "sd_hina_plugin.Automagic_CameAmp"\nlearning_rate = 1e-4\n')
    assert status == 1 and "INVALID" in out
    assert "case-sensitively" in out and "did you mean 'sd_hina_plugin.Automagic_CameAMP'?" in out
    for name in ("sd_hina_plugin.HinaAdamW", "sd_hina_plugin.Automagic_CameAMP", "sd_hina_plugin.optimizers.HinaAdamWCore"):
        status, out = _validate(tmp_path, capsys, f'optimizer_type = "{name}"\nlearning_rate = 1e-4\n')
        assert status == 0, out
    status, out = _validate(tmp_path, capsys, 'optimizer_type = "sd_hina_plugin.stats"\n')
    assert status == 1 and "finds no optimizer of that name" in out


@pytest.mark.parametrize("lr", ["-1e-4", "0.0", "'1e-4'"])
def test_validate_rejects_a_learning_rate_kohya_would_pass_on(tmp_path, capsys, lr):
    status, out = _validate(tmp_path, capsys, f'optimizer_type = "sd_hina_plugin.HinaAdamWCore"\nlearning_rate = {lr}\n')
    assert status == 1 and "learning_rate" in out, out


def test_validate_reports_keys_kohya_does_not_know(tmp_path, capsys):
    text = ('[training]\nlearnig_rate = 3e-4\nmax_train_steps = 10\nnetwork_dim = 16\n'
            '[optimizer]\noptimizer_type = "sd_hina_plugin.Automagic_CameAMP"\n')
    status, out = _validate(tmp_path, capsys, text)
    assert status == 1
    assert "unknown key 'learnig_rate' (did you mean 'learning_rate'?)" in out
    assert "max_train_steps" not in out and "network_dim" not in out


def test_validate_says_the_equals_sign_is_missing(tmp_path, capsys):
    status, out = _validate(tmp_path, capsys, 'optimizer_type = "sd_hina_plugin.HinaAdamWCore"\n'
                                              'learning_rate = 1e-4\noptimizer_args = ["weight_decay"]\n')
    assert status == 1 and "missing '='" in out and "quote strings" not in out


def test_validate_reports_every_error_of_a_file(tmp_path, capsys):
    text = ('learnig_rate = 3e-4\noptimizer_type = "sd_hina_plugin.Automagic_CameAmp"\nlearning_rate = -1e-4\n'
            'optimizer_args = ["weight_decay", "use_grams=true", "low_precision_update=kahan", "betas=(0.9, 2.0, 0.99)", "lr=1e-3"]\n')
    status, out = _validate(tmp_path, capsys, text)
    errors = [line for line in out.splitlines() if line.startswith("  - ")]
    assert status == 1
    for fragment in ("case-sensitively", "learning_rate = -0.0001", "missing '='", "True/False (use_grams=True)",
                     "quote strings (low_precision_update='kahan')", "'betas'", "lr twice", "'learnig_rate'"):
        assert sum(fragment in e for e in errors) == 1, (fragment, errors)
    assert len(errors) == 8, errors


def test_known_keys_come_from_the_sources_or_the_shipped_list(tmp_path, monkeypatch):
    """The shipped list is what scripts/gen_kohya_keys.py reads from the sd-scripts snapshot (when present)."""
    from sd_hina_plugin.kohya import _kohya_keys
    from sd_hina_plugin.kohya.config_keys import find_sd_scripts, keys_from_sources, known_keys

    assert {"learning_rate", "optimizer_type", "optimizer_args", "network_module", "cache_text_encoder_outputs",
            "config_file", "max_train_steps"} <= _kohya_keys.KEYS
    root = find_sd_scripts()
    if root is not None:
        assert keys_from_sources(root) == _kohya_keys.KEYS, "run scripts/gen_kohya_keys.py"
    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    keys, source = known_keys()
    assert keys == _kohya_keys.KEYS and "shipped" in source
    fake = tmp_path / "sd"
    (fake / "library").mkdir(parents=True)
    (fake / "library" / "train_util.py").write_text(
        "def add_optimizer_arguments(parser):\n    parser.add_argument('--learning_rate', type=float)\n"
        "    parser.add_argument('--my-new-key', dest='renamed')\n")
    (fake / "my_train_network.py").write_text(
        "def setup_parser():\n    parser = argparse.ArgumentParser()\n    train_util.add_training_arguments(parser)\n"
        "    parser.add_argument('--save_model_as')\n    return parser\n"
        "def other():\n    parser.add_argument('--not_a_training_key')\n")
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(fake))
    keys, source = known_keys()
    assert keys == {"learning_rate", "renamed", "save_model_as"} and str(fake) in source
