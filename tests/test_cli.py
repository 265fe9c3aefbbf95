"""The command-line contract of attnmt-evaluate and attnmt-translate, run as real subprocesses."""

from __future__ import annotations

import json
import os
import random
import re
import select
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

from conftest import FIXTURE_CORPUS


def run(command: str, *args: str, stdin: str | bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m attnmt.cli.COMMAND ARGS`` with text stdout/stderr."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", f"attnmt.cli.{command}", *args], input=data,
                          capture_output=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def translate_alone(ckpt: Path, lines: list[str], **decode) -> list[str]:
    """Each line translated on its own, in this process: the reference for order and batching."""
    from conftest import decode_config, native_engine

    engine, cfg = native_engine(ckpt), decode_config(**decode)
    return [engine.translate([line], cfg)[0].texts[0] for line in lines]


def test_evaluate_json_bleu_is_sacrebleu_on_the_hyp_file(trained_checkpoint, tmp_path) -> None:
    import sacrebleu

    hyp = tmp_path / "hyp.en"
    src, ref = FIXTURE_CORPUS / "test.de", FIXTURE_CORPUS / "test.en"
    result = run("evaluate", f"ckpt={trained_checkpoint}", f"src={src}", f"ref={ref}", f"hyp={hyp}", "beam_size=3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    hypotheses = hyp.read_text(encoding="utf-8").splitlines()
    references = ref.read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == report["n_sentences"] == len(references)
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=0.01)
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score, abs=0.01)
    assert report["bleu_signature"].startswith("nrefs:1|case:mixed") and "tok:13a" in report["bleu_signature"]
    assert report["sentences_per_second"] > 0
    assert report["bleu"] > 30, "the trained fixture model should translate its own test set well"


def test_evaluate_src_ref_reads_two_text_files_without_importing_datasets(trained_checkpoint) -> None:
    def imported(*args: str) -> set[str]:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "attnmt.cli.evaluate",
                               f"ckpt={trained_checkpoint}", "beam_size=1", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return set(re.findall(r"^import time:.*\|\s+([\w.]+)$", proc.stderr, re.MULTILINE))

    files = imported(f"src={FIXTURE_CORPUS / 'test.de'}", f"ref={FIXTURE_CORPUS / 'test.en'}")
    assert "sacrebleu" in files and "datasets" not in files and "pyarrow" not in files
    assert "datasets" in imported("split=test")  # a split of the data config is read through datasets


@pytest.mark.parametrize("command, misspelt, key", [
    ("translate", "beamsize=2", "beam_size"), ("evaluate", "lenpenalty=1", "len_penalty"),
    ("export", "quantisation=int8", "quantization"), ("serve", "max_pending=5", "max_pending_lines"),
    ("average", "lst=2", "last"),
])
def test_the_commands_share_one_command_line(command: str, misspelt: str, key: str) -> None:
    """The same key=value overrides, the same one line for a misspelt key (before any model is read),
    the same --help (Hydra's, naming the command)."""
    refused = run(command, "ckpt=missing.pt", misspelt)
    assert refused.returncode == 2 and refused.stdout == ""
    name = misspelt.split("=")[0]
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"attnmt-{command}: error: {misspelt}: {command}.yaml has no key '{name}'; did you mean "
                           f"{key}"), line
    helped = run(command, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith(f"attnmt-{command} is powered by Hydra.")
    assert f"{key}:" in helped.stdout.split("== Config ==")[1]  # the composed configs/{command}.yaml


def test_evaluate_a_split_of_the_checkpoints_data_config(trained_checkpoint) -> None:
    result = run("evaluate", f"ckpt={trained_checkpoint}", "split=test", "beam_size=1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n_sentences"] == 40
    assert report["test_set"] == "split test"


def test_translate_keeps_every_line_in_order(trained_checkpoint, tmp_path) -> None:
    fixture = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()
    long_line = " ".join(fixture) * 8  # far beyond the model's 256 positions
    lines = [fixture[0], "", "   ", fixture[5], "Привет, как дела?", "東京は大きな都市です。", long_line,
             fixture[10], "", fixture[3]]
    src = tmp_path / "in.de"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.en"

    from_file = run("translate", f"ckpt={trained_checkpoint}", f"input={src}", f"output={out}", "beam_size=2")
    assert from_file.returncode == 0, from_file.stderr
    file_lines = out.read_text(encoding="utf-8").split("\n")
    assert file_lines[-1] == "" and len(file_lines) - 1 == len(lines)
    file_lines = file_lines[:-1]
    assert "line 7:" in from_file.stderr and "truncated" in from_file.stderr

    from_stdin = run("translate", f"ckpt={trained_checkpoint}", "beam_size=2", stdin="".join(line + "\n" for line in lines))
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.split("\n")[:-1] == file_lines

    assert file_lines[1] == file_lines[2] == file_lines[8] == ""
    # Each line's translation is what it gets alone: batching and sorting restored the order.
    alone = translate_alone(trained_checkpoint, [lines[i] for i in (0, 3, 7, 9)], beam_size=2)
    assert [file_lines[i] for i in (0, 3, 7, 9)] == alone
    assert all(file_lines[i] for i in (0, 3, 4, 5, 6, 7, 9))


def test_translate_text_argument_and_nbest_format(trained_checkpoint) -> None:
    sentence = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()[2]
    single = run("translate", f"ckpt={trained_checkpoint}", f"text={sentence}", "beam_size=4")
    assert single.returncode == 0, single.stderr
    assert single.stdout.splitlines() == translate_alone(trained_checkpoint, [sentence], beam_size=4)

    nbest = run("translate", f"ckpt={trained_checkpoint}", "beam_size=4", "nbest=3",
                stdin=f"{sentence}\n\n{sentence}\n")
    assert nbest.returncode == 0, nbest.stderr
    rows = [line.split(" ||| ") for line in nbest.stdout.splitlines()]
    assert [int(r[0]) for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(r) == 3 for r in rows)
    scores = [float(r[2]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)
    assert rows[0][1] == single.stdout.splitlines()[0]
    assert [r[1] for r in rows[3:6]] == ["", "", ""]
    assert [r[1:] for r in rows[6:]] == [r[1:] for r in rows[:3]]


def test_averaged_checkpoints_translate(trained_checkpoint, tmp_path) -> None:
    """attnmt-average writes the element-wise mean of its inputs' weights, and ``ckpt=[a,b]`` translates
    with that mean: as a checkpoint holding the mean computed here does, and unlike either input."""
    import torch

    from attnmt.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained_checkpoint)
    first = state["model"]
    noise = torch.Generator().manual_seed(3)
    second = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=noise) if v.is_floating_point() and v.numel() > 1
              else v for k, v in first.items()}
    mean = {k: ((first[k].double() + second[k].double()) / 2).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}
    paths = {}
    for name, weights in (("second", second), ("mean", mean)):
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint({**state, "model": weights}, paths[name])

    averaged = tmp_path / "averaged.pt"
    result = run("average", f"ckpt=[{trained_checkpoint},{paths['second']}]", f"out={averaged}")
    assert result.returncode == 0, result.stderr
    written = load_checkpoint(averaged)["model"]
    assert written.keys() == mean.keys()
    for key, value in mean.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=1e-6)
    # The argparse form of earlier versions writes the same file, and says what to write instead.
    old = run("average", str(trained_checkpoint), str(paths["second"]), "--out", str(tmp_path / "old.pt"))
    assert old.returncode == 0 and "attnmt-average ckpt=[" in old.stderr, old.stderr
    assert (tmp_path / "old.pt").read_bytes() == averaged.read_bytes()

    lines = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()[:20]
    stdin = "".join(line + "\n" for line in lines)

    result = run("translate", f"ckpt=[{trained_checkpoint},{paths['second']}]", "beam_size=2", stdin=stdin)
    assert result.returncode == 0, result.stderr
    on_the_fly = result.stdout.splitlines()

    def translate(ckpt: Path) -> list[str]:  # in this process: a reference for the command's output
        from conftest import decode_config, native_engine

        return [t.texts[0] for t in native_engine(ckpt).translate(lines, decode_config(beam_size=2))]

    assert len(on_the_fly) == len(lines)
    assert on_the_fly == translate(paths["mean"])
    assert on_the_fly != translate(trained_checkpoint) and on_the_fly != translate(paths["second"])


def test_attention_plot_is_written(trained_checkpoint, tmp_path) -> None:
    from PIL import Image

    sentence = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()[1]
    plots = tmp_path / "att"
    # Line 4: NFKC turns U+FDFA into 18 characters and the tab into a space; the labels must follow.
    odd = f"  Der\tHund \ufdfa  {sentence}"
    result = run("translate", f"ckpt={trained_checkpoint}", f"attention_plot={plots}",
                 stdin=f"{sentence}\n\n{sentence}\n{odd}\n")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in plots.iterdir()) == ["line000001.png", "line000003.png", "line000004.png"]
    width, height = Image.open(plots / "line000001.png").size
    assert 200 <= width <= 1500 and 150 <= height <= 1500, (width, height)


def test_translate_streams_before_input_ends(trained_checkpoint) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "attnmt.cli.translate", f"ckpt={trained_checkpoint}", "beam_size=1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = (FIXTURE_CORPUS / "train.de").read_text(encoding="utf-8").splitlines()[:300]
        proc.stdin.write("".join(line + "\n" for line in lines).encode())
        proc.stdin.flush()  # ... and the pipe stays open
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        assert ready, "no output within 90 s although 300 lines were waiting"
        first = proc.stdout.readline()
        assert first.strip() and proc.poll() is None
        proc.stdin.close()
        rest = proc.stdout.read().decode().splitlines()
        assert proc.wait(timeout=60) == 0
        assert 1 + len(rest) == 300
    finally:
        proc.kill()


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "line_mismatch", "missing_input", "bad_utf8",
                                  "no_ckpt", "nbest_zero", "buffer_zero", "output_is_a_folder", "empty_test_set",
                                  "misspelt_key", "wrong_type"])
def test_bad_input_is_one_line_and_nonzero_exit(case: str, trained_checkpoint, tmp_path) -> None:
    good_src = FIXTURE_CORPUS / "test.de"
    if case == "missing_ckpt":
        result, expected = run("translate", f"ckpt={tmp_path}/nope.pt", "text=Hallo"), "nope.pt"
    elif case == "corrupt_ckpt":
        junk = tmp_path / "junk.pt"
        junk.write_bytes(trained_checkpoint.read_bytes()[:5000])
        result, expected = run("translate", f"ckpt={junk}", "text=Hallo"), "junk.pt"
    elif case == "line_mismatch":
        short_ref = tmp_path / "ref.en"
        short_ref.write_text("only one line\n", encoding="utf-8")
        result = run("evaluate", f"ckpt={trained_checkpoint}", f"src={good_src}", f"ref={short_ref}")
        expected = "has 40 lines but ref="
    elif case == "missing_input":
        result, expected = run("translate", f"ckpt={trained_checkpoint}", f"input={tmp_path}/missing.de"), "missing.de"
    elif case == "no_ckpt":
        result, expected = run("translate", "text=Hallo"), "ckpt= is required"
    elif case == "nbest_zero":
        result, expected = run("translate", f"ckpt={trained_checkpoint}", "text=Hallo", "nbest=0"), "nbest=0 must be at least 1"
    elif case == "buffer_zero":  # read ahead nothing: used to spin forever
        result = run("translate", f"ckpt={trained_checkpoint}", "text=Hallo", "buffer_lines=0")
        expected = "buffer_lines=0 must be at least 1"
    elif case == "output_is_a_folder":
        result, expected = run("translate", f"ckpt={trained_checkpoint}", "text=Hallo", f"output={tmp_path}"), str(tmp_path)
    elif case == "misspelt_key":
        result, expected = run("translate", f"ckpt={trained_checkpoint}", "text=Hallo", "beamsize=2"), "did you mean beam_size?"
    elif case == "wrong_type":
        result, expected = run("translate", f"ckpt={trained_checkpoint}", "text=Hallo", "nbest=two"), "nbest=two: Value 'two'"
    elif case == "empty_test_set":
        empty = tmp_path / "empty.de"
        empty.write_text("", encoding="utf-8")
        result, expected = run("evaluate", f"ckpt={trained_checkpoint}", f"src={empty}", f"ref={empty}"), "no lines"
    else:
        bad = tmp_path / "bad.de"
        bad.write_bytes("Der Hund läuft.\n".encode() + b"Die Katze \xfc\n")
        result, expected = run("translate", f"ckpt={trained_checkpoint}", f"input={bad}"), "bad.de line 2: invalid UTF-8"
    assert result.returncode != 0
    if case in ("misspelt_key", "wrong_type"):  # composed without Hydra: a user error like the others
        assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    if case == "bad_utf8":
        assert result.stdout.splitlines() == translate_alone(trained_checkpoint, ["Der Hund läuft."], beam_size=5)


def test_translate_leaves_hydras_own_flags_to_hydra() -> None:
    # The command composes its config without Hydra's start-up, but --cfg and --help still work.
    result = run("translate", "--cfg", "job", "ckpt=model.pt", "nbest=2")
    assert result.returncode == 0, result.stderr
    assert "nbest: 2" in result.stdout and "ckpt: model.pt" in result.stdout
    assert run("translate", "--help").returncode == 0


def hostile_sentences(n: int, seed: int = 0) -> list[str]:
    """Strings a user can type that Hydra's override grammar has a meaning for: quotes, brackets,
    braces, ``${``, ``=``, commas, backslashes (trailing too), spaces and tabs, and non-ASCII letters."""
    rng = random.Random(seed)
    alphabet = list("aZ09 .,;:!?'\"[](){}$=\\/@#%^&*+-_~`|<>\t") + ["${x}", "ä", "ß", "€", "日本", "Привет", "😀", "\u200b"]
    made = ["Ein Hund\\", "[Foto] Ein Hund, eine Katze.", "'Hallo' sagt er.", '"Hallo", sagt er.', "a=b", "${oc.env:HOME}",
            "[a,b]", "", "   ", "text=doppelt", "--help", "-m", "key=value=x", "x]", "{a: 1}", "\\n"]
    while len(made) < n:
        made.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    return made


def test_any_text_argument_reaches_the_model_verbatim(monkeypatch, capsys, restore_logging) -> None:
    """Each text= argument is one input line exactly as typed, and gives exactly one output line."""
    import attnmt.cli.translate as command
    from attnmt.inference import Translation

    received: list[list[str]] = []

    def fake_translate(lines, cfg, first_line=1, on_batch=None, prefix=None):
        received.append(list(lines))
        return [Translation([f"out{first_line + i}"], [0.0], [[]]) for i in range(len(lines))]

    monkeypatch.setattr(command, "open_engine", lambda cfg, paths, device: SimpleNamespace(translate=fake_translate))
    for text in hostile_sentences(120):
        monkeypatch.setattr(sys, "argv", ["attnmt-translate", "ckpt=model.pt", f"text={text}", "beam_size=2"])
        command.main()
        assert sum(received[-1:], []) == [text], repr(text)
        assert capsys.readouterr().out == "out1\n", repr(text)
    # Several text= arguments: several lines, in order.
    many = ["[a,b]", "'Hallo'", "", "Hund\\", "${y}", "ein=zwei"]
    monkeypatch.setattr(sys, "argv", ["attnmt-translate", "ckpt=model.pt", *(f"text={t}" for t in many)])
    command.main()
    assert received[-1] == many
    assert capsys.readouterr().out.splitlines() == [f"out{i}" for i in range(1, len(many) + 1)]


def test_text_with_quotes_and_brackets_translates_as_one_line(trained_checkpoint) -> None:
    for text in ("[Foto] Ein Hund, eine Katze.", "'Hallo' sagt er.", "Ein Hund\\"):
        result = run("translate", f"ckpt={trained_checkpoint}", f"text={text}", "beam_size=2")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("\n") == 1 and result.stdout.strip(), (text, result.stdout)
        assert result.stdout.splitlines() == translate_alone(trained_checkpoint, [text], beam_size=2)



def test_an_output_that_is_an_input_is_refused_before_any_work(trained_checkpoint, tmp_path) -> None:
    from attnmt.cli.common import UserError, output_file

    src = tmp_path / "in.de"
    src.write_text("Ein Hund läuft.\nZwei Katzen.\n", encoding="utf-8")
    result = run("translate", f"ckpt={trained_checkpoint}", f"input={src}", f"output={src}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"output={src} is the input input={src}" in result.stderr.strip().splitlines()[-1], result.stderr
    result = run("evaluate", f"ckpt={trained_checkpoint}", f"src={src}", f"ref={src}", f"hyp={src}")
    assert result.returncode == 2 and f"hyp={src} is the input src={src}" in result.stderr.strip().splitlines()[-1]
    link = tmp_path / "same-file.de"
    os.link(src, link)  # another name for the same file
    for path, inputs, message in [(link, {"input": str(src)}, f"output={link} is the input input={src}"),
                                  (trained_checkpoint, {"ckpt": [str(trained_checkpoint)]}, "is the input ckpt=")]:
        with pytest.raises(UserError, match=re.escape(message)), output_file(str(path), "output", inputs):
            pass
    assert src.read_text(encoding="utf-8") == "Ein Hund läuft.\nZwei Katzen.\n"
    assert trained_checkpoint.stat().st_size > 10_000


def test_an_output_appears_whole_or_not_at_all(trained_checkpoint, tmp_path) -> None:
    out = tmp_path / "out.en"
    out.write_text("yesterday's translations\n", encoding="utf-8")
    bad = tmp_path / "bad.de"
    bad.write_bytes("Der Hund läuft.\n".encode() + b"Die Katze \xfc\n")  # fails at line 2, after line 1 is translated
    result = run("translate", f"ckpt={trained_checkpoint}", f"input={bad}", f"output={out}", "buffer_lines=1")
    assert result.returncode != 0 and "bad.de line 2: invalid UTF-8" in result.stderr
    assert out.read_text(encoding="utf-8") == "yesterday's translations\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.de", "out.en"]  # no temporary file left
    good = tmp_path / "good.de"
    good.write_text("Der Hund läuft.\n", encoding="utf-8")
    assert run("translate", f"ckpt={trained_checkpoint}", f"input={good}", f"output={out}").returncode == 0
    assert out.read_text(encoding="utf-8").splitlines() == translate_alone(trained_checkpoint, ["Der Hund läuft."],
                                                                           beam_size=5)


def test_an_output_through_a_link_or_to_a_device_keeps_the_link_and_the_device(tmp_path) -> None:
    from attnmt.cli.common import output_file

    real = tmp_path / "real.en"
    real.write_text("old\n", encoding="utf-8")
    link = tmp_path / "link.en"
    link.symlink_to(real)
    with output_file(str(link), "output", {}) as out:
        out.write("new\n")
    assert link.is_symlink() and real.read_text(encoding="utf-8") == "new\n"
    with output_file("/dev/null", "output", {}) as out:  # written as it is: no temporary file in /dev, no rename
        out.write("anything\n")
    assert Path("/dev/null").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.en", "real.en"]


def test_import_refuses_a_misspelt_key_as_the_other_commands_do_and_helps_with_status_0(capsys) -> None:
    from attnmt.cli import import_

    with pytest.raises(SystemExit) as refused:
        import_.main(["frm=opus-mt-en-de", "out=x.pt"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == ("attnmt-import: error: frm=opus-mt-en-de: attnmt-import has no key 'frm'; "
                                               "did you mean from? the keys are from, out, overwrite")
    import_.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: attnmt-import from=")
