"""Every command's ``--help`` names the command and prints no argparse escapes (``%%``);
lens-eval offers only the options it reads."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from lens_kernels.bench import cli as bench_cli  # noqa: E402
from lens_kernels.train.cli import eval_main, train_main  # noqa: E402
from lens_kernels.train.study import study_main  # noqa: E402

COMMANDS = {
    "lens-train": train_main,
    "lens-eval": eval_main,
    "lens-study": study_main,
    "lens-bench": bench_cli.main,
}


def help_text(main, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_the_command_and_has_no_escapes(name, capsys):
    text = help_text(COMMANDS[name], capsys)
    assert text.startswith(f"usage: {name} ") and "%%" not in text
    assert "95%" in text if name == "lens-study" else True


def test_lens_eval_offers_only_what_it_reads(capsys):
    text = help_text(eval_main, capsys)
    for absent in ("--loss-backend", "--prompts-per-step", "--lr", "--modes", "--steps"):
        assert absent not in text, absent
    for present in ("--model", "--eval-samples", "--progress", "--seed"):
        assert present in text, present
