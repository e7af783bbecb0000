"""Every command in README.md must be valid: a README snippet that does not run is a bug.

The two set-up commands are what CI runs (`.ci/run` executes the test command, then `.ci/quickstart.sh` runs the
quickstart's install verbatim in a fresh virtualenv and `lmuasr demo --quick` in it). Every other ``lmuasr``, ``torchrun``, ``sbatch`` or ``cluster/``
command is parsed here by the real click parser (each subcommand, each option and its type), and the scripts it
names must exist. Running them at full scale needs a corpus and a cluster; the same commands are run on small
data by the CLI tests (prep on a miniature GigaSpeech, train/resume/torchrun, eval, transcribe, bench, demo).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from lmu_asr.cli import main
from lmu_asr.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def lmuasr_args(command: str) -> list[str] | None:
    """The arguments `lmuasr` receives from a README command, or None for set-up lines."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if words[0] == "lmuasr":
        return words[1:]
    if words[0] == "torchrun":
        i = words.index("-m")
        assert words[i + 1] == "lmu_asr.cli", command
        return words[i + 2:]
    if words[0] == "sbatch":
        script = next(w for w in words[1:] if not w.startswith("-"))
        return ["train", "--shards", "S", "--out", "R", *words[words.index(script) + 1:]], script
    if words[0].startswith("cluster/"):
        return ["train", "--shards", "S", "--out", "R", *words[1:]], words[0]
    if words[0] == "bash" and words[1] == "bench/gpu.sh":  # the GPU kit: `lmuasr bench gpu` underneath
        return ["bench", "gpu", *words[2:]], words[1]
    if words[0] in ("python", "python3") and words[1].startswith("examples/"):
        return words[1:]
    return None


def parse(args: list[str]) -> None:
    """Resolve the command path and parse every option exactly as the CLI would, without running anything."""
    ctx = main.make_context("lmuasr", list(args))
    group, parent = main, ctx
    rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args,
                                                                                          *ctx.args]
    while isinstance(group, click.Group):
        name, cmd, rest = group.resolve_command(parent, rest)
        assert cmd is not None, f"no command {name}"
        parent = cmd.make_context(name, list(rest), parent=parent)
        group = cmd
        if isinstance(cmd, click.Group):
            rest = [*getattr(parent, "_protected_args", []), *parent.args]


COMMANDS = bash_commands()


def test_readme_has_the_two_setup_commands_and_many_others() -> None:
    setup = [c for c in COMMANDS if "pip install" in c]
    assert len(setup) == 2 and "lmuasr demo" in setup[0] and "pytest" in setup[1]
    # .ci/quickstart.sh runs everything before "&& lmuasr demo" verbatim in a fresh venv: that split must exist
    assert "&& lmuasr demo" in setup[0] and "[" not in setup[0].split("&& lmuasr demo")[0].split("pip install")[-1]
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("command", [c for c in COMMANDS if "pip install" not in c])
def test_readme_command_parses(command: str) -> None:
    got = lmuasr_args(command)
    assert got is not None, f"README command of an unknown kind: {command}"
    if isinstance(got, list) and got[0].startswith("examples/"):  # a standalone example: its own parser
        import importlib.util

        spec = importlib.util.spec_from_file_location("example", ROOT / got[0])
        module = importlib.util.module_from_spec(spec)
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("kaldi_native_fbank") is None:
            pytest.skip("the example's dependencies (onnxruntime, kaldi-native-fbank) are not installed")
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.parser().parse_args(got[1:])
        return
    if isinstance(got, tuple):  # a cluster script: it exists and passes its arguments on to `lmuasr train`
        args, script = got
        assert (ROOT / script).is_file(), script
        assert "lmuasr" in (ROOT / script).read_text() or "lmu_asr.cli" in (ROOT / script).read_text()
    else:
        args = got
    parse(args)
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--preset":
            assert value in PRESETS, f"unknown preset {value} in: {command}"


def test_parse_rejects_what_the_cli_rejects() -> None:  # the checker itself can fail
    with pytest.raises(click.UsageError):
        parse(["train", "--shards", "S", "--out", "R", "--no-such-flag"])
    with pytest.raises(click.UsageError):
        parse(["bench", "nonsense"])
    with pytest.raises(click.BadParameter):
        parse(["train", "--shards", "S", "--out", "R", "--precision", "fp8"])
