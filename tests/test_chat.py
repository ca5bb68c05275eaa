"""Chat (valley_jax.chat): prompts in template v1 and the authors' legacy form, frames as in
training, answers streamed and cleaned, multi-turn history, the command line (once with --json,
interactive in a pty) and its error messages. A tiny random Valley checkpoint with a small
sentencepiece tokenizer and a synthetic video are built here; checks are exact values."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
import pytest

from test_generate import IMAGE_SIZE, NUM_FRAMES, random_model, tiny_config, train_tokenizer
from valley_jax import chat, checkpoint, convert, tokens
from valley_jax.data import frames as frames_lib
from valley_jax.data import synthetic
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data.text import load_tokenizer

CONTEXT = 256  # the tiny model's max_position: the over-long prompt test exceeds it
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{ckpt, tokenizer, video, video2, image}: a demo-style checkpoint (model + tokenizer
    folder, as the trainer exports it) and media files."""
    root = tmp_path_factory.mktemp("chat")
    tok_dir = train_tokenizer(root / "tokenizer")
    tokenizer = load_tokenizer(str(tok_dir))
    model = random_model(tiny_config(tokenizer, max_position=CONTEXT), seed=1)
    checkpoint.save_model(root / "ckpt", model, tok_dir)
    rng = np.random.default_rng(0)
    for name in ("video", "video2"):  # 10 frames of 64 x 80 (the crop takes the middle)
        synthetic.write_video(root / f"{name}.mp4", rng.integers(0, 256, (10, 64, 80, 3), np.uint8))
    synthetic.write_image(root / "image.png", rng.integers(0, 256, (40, 50, 3), np.uint8))
    return dict(root=root, ckpt=root / "ckpt", tokenizer=tokenizer, video=str(root / "video.mp4"),
                video2=str(root / "video2.mp4"), image=str(root / "image.png"))


@pytest.fixture(scope="module")
def session(world):
    return chat.load(world["ckpt"])


def media_block(frames: int) -> str:
    return tokens.media_tokens(frames, (IMAGE_SIZE // 14) ** 2)


def chat_command(world, *args) -> list[str]:
    return [sys.executable, "-m", "valley_jax.chat", "--checkpoint", str(world["ckpt"]), *args]


def chat_env(world) -> dict:
    """The programs share a compilation cache: the second reuses the first's prefill and step."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(world["root"] / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


# ---------------------------------------------------------------------------------------------
# Prompts, frames and clean-up


def test_prompts_in_template_v1_and_the_authors_form(session):
    pixels = np.zeros((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    media = chat.Media("video", "/v.mp4", pixels)
    turns = [("<video>\nWhat moves?", "a red square")]
    block = media_block(NUM_FRAMES)
    assert session.prompt_text(turns, "Which way?", media) == (
        tokens.SYSTEM_V1 + f"\n\n### Human: {block}\nWhat moves?\n### Assistant: a red square"
        "\n### Human: Which way?\n### Assistant:")
    legacy = chat.Session(session.model, session.tokenizer, legacy=True)
    assert legacy.prompt_text([], "Describe it.\n<video>", media) == (
        tokens.SYSTEM_INFERENCE + f"\n\n### Human: Describe it.\n{block} \n###")
    assert legacy.prompt_text(turns, "Which way?", media) == (
        tokens.SYSTEM_INFERENCE + f"\n\n### Human: {block}\nWhat moves? \n### Assistent: a red "
        "square \n### Human: Which way? \n###")
    custom = chat.Session(session.model, session.tokenizer, system="Be brief.")
    assert custom.prompt_text([], "Hi", None) == "Be brief.\n\n### Human: Hi\n### Assistant:"


def test_frames_are_loaded_as_in_training(session, world):
    training = DataConfig(datasets=(DatasetSpec(path="x"),), tokenizer_path="", num_frames=4,
                          image_size=28, resize_size=32, num_patches=4)
    video = frames_lib.VideoFile(world["video"])
    want = frames_lib.load_video_frames(video, np.array([0, 3, 6, 9]), training)
    got = session.frames(video=world["video"])
    assert got.dtype == np.uint8 and got.shape == (4, 28, 28, 3)
    np.testing.assert_array_equal(got, want)
    image = session.frames(image=world["image"])
    assert image.shape == (1, 28, 28, 3)
    np.testing.assert_array_equal(image[0], frames_lib.load_image(world["image"], training))
    assert chat.resize_size_for(224) == 256 and chat.resize_size_for(112) == 128


def test_response_clean_up_and_what_may_stream():
    assert chat.clean_v1(" left\n### Human: and?") == "left"
    assert chat.clean_v1(" Assistant: a red square\n###") == "a red square"
    # The authors' process_response: leading patterns, repeatedly, then cut at "###".
    assert chat.clean_legacy(" Assistant: red\n###") == "red"
    assert chat.clean_legacy("### Valley: Response:  blue ### Human: x") == "blue"
    assert chat.clean_legacy("Assistant: ###") == ""
    raws = [" Assistant: red squ##are\n### Human", "  Assis", "Valley: Response: It is ## # red###",
            " left\n##", " caf\u00e9 \ufffd", " Asx: #", " ##"]
    for clean, prefixes in ((chat.clean_v1, ("Assistant:",)),
                            (chat.clean_legacy, chat.LEGACY_PREFIXES)):
        for raw in raws:
            final, shown = clean(raw), ""
            for i in range(len(raw) + 1):
                now = chat.shown_so_far(raw[:i], clean, prefixes)
                assert now.startswith(shown) and final.startswith(now), (raw, i, now, final)
                shown = now
    assert chat.shown_so_far(" Assistant: red ##", chat.clean_v1, ("Assistant:",)) == "red"
    assert chat.shown_so_far(" Assis", chat.clean_v1, ("Assistant:",)) == ""


# ---------------------------------------------------------------------------------------------
# The Session API: streaming, history, media


def test_session_streams_and_keeps_history(session, world):
    tokenizer = world["tokenizer"]
    session.reset()
    notes = []
    session.notify = notes.append
    pieces = []
    first = session.ask("What moves?", video=world["video"], max_new_tokens=12,
                        stream=pieces.append)
    assert notes == ["note: no <video> in the question; it goes in front"]
    assert first and "".join(pieces) == first and len(pieces) > 1
    reply = session.last
    assert reply.text == first == chat.clean_v1(
        tokenizer.decode(reply.token_ids, skip_special_tokens=True))
    block = media_block(NUM_FRAMES)
    expect = tokens.SYSTEM_V1 + f"\n\n### Human: {block}\nWhat moves?\n### Assistant:"
    assert reply.prompt_ids == [1] + tokenizer.encode(expect, add_special_tokens=False)

    second = session.ask("Which way?", max_new_tokens=12)  # same video, with the first answer
    expect += f" {first}\n### Human: Which way?\n### Assistant:"
    assert session.last.prompt_ids == [1] + tokenizer.encode(expect, add_special_tokens=False)
    assert session.turns == [("<video>\nWhat moves?", first), ("Which way?", second)]

    # Without history: a fresh prompt on the same video, nothing recorded.
    session.ask("Which way?", history=False, max_new_tokens=12)
    fresh = tokens.SYSTEM_V1 + f"\n\n### Human: {block}\nWhich way?\n### Assistant:"
    assert session.last.prompt_ids == [1] + tokenizer.encode(fresh, add_special_tokens=False)
    assert len(session.turns) == 2
    # Another video starts a new conversation; the same one again continues it.
    session.ask("<video> What is this?", video=world["video2"], max_new_tokens=4)
    assert [q for q, _ in session.turns] == ["<video> What is this?"]
    session.ask("And then?", video=world["video2"], max_new_tokens=4)
    assert len(session.turns) == 2
    session.reset()
    assert session.turns == [] and session.media is None


def test_session_input_errors(session, world):
    session.reset()
    with pytest.raises(chat.ChatError, match="placeholder but no video or image"):
        session.ask("<video> What is it?")
    with pytest.raises(chat.ChatError, match="more than one media placeholder"):
        session.ask("<video> and <image>?", video=world["video"])
    session.ask("<image> What is it?", image=world["image"], max_new_tokens=2)
    assert session.last.prompt_ids.count(world["tokenizer"].convert_tokens_to_ids(
        tokens.VI_FRAME)) == 1  # an image is one frame
    with pytest.raises(chat.ChatError, match="first question already"):
        session.ask("<image> again?")
    with pytest.raises(chat.ChatError, match="spells a media token"):
        session.ask("What is <im_patch>?")
    with pytest.raises(chat.ChatError, match="video or an image, not both"):
        session.ask("What?", video=world["video"], image=world["image"])
    session.reset()


def test_an_authors_hugging_face_folder_is_converted_on_the_fly(session, world, tmp_path):
    convert.to_hf(world["ckpt"], tmp_path / "hf", fmt="valley")
    # The authors' releases carry the tokenizer with Valley's tokens added (the trainer's
    # checkpoint folder holds it without them; to_hf copies it as it is).
    world["tokenizer"].save_pretrained(tmp_path / "hf")
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert meta["architectures"] == ["ValleyLlamaForCausalLM"]
    theirs = chat.load(tmp_path / "hf", num_frames=NUM_FRAMES)
    session.reset()
    for s in (session, theirs):
        s.ask("What moves?", video=world["video"], max_new_tokens=8)
    assert theirs.last == session.last
    session.reset()


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_answers_once_as_json(session, world):
    query = "<video>\nWhich colour is the square?"
    run = subprocess.run(chat_command(world, "--video", world["video"], "--query", query, "--json",
                                      "--max-new-tokens", "10"),
                         capture_output=True, text=True, cwd=REPO, env=chat_env(world),
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)  # exactly one JSON object on stdout
    assert set(out) == {"text", "token_ids"}
    decoded = world["tokenizer"].decode(out["token_ids"], skip_special_tokens=True)
    assert out["text"] and decoded.split("###")[0].strip() == out["text"]
    session.reset()
    assert session.ask(query, video=world["video"], max_new_tokens=10) == out["text"]
    assert session.last.token_ids == out["token_ids"]
    session.reset()


class Terminal:
    """A program in a pseudo-terminal: what it prints, and typing into it."""

    def __init__(self, argv, env=None):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                                     env=env, close_fds=True)
        os.close(slave)
        self.output = b""

    def read_until(self, marker: bytes, count: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while self.output.count(marker) < count:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError(self.output.decode(errors="replace"))
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the program has closed the terminal
                chunk = b""
            if not chunk:
                raise EOFError(self.output.decode(errors="replace"))
            self.output += chunk

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def test_cli_interactive_two_turns_in_a_pty(world):
    term = Terminal(chat_command(world, "--video", world["video"], "--max-new-tokens", "10",
                                 "--debug-prompt"), env=chat_env(world))
    term.read_until(b"Human: ", 1)
    term.type("What moves?")
    term.read_until(b"Human: ", 2)
    term.type("Which way?")
    term.read_until(b"Human: ", 3)
    term.type("/exit")
    try:
        term.read_until(b"\0", 1, timeout=60)  # until the program ends
    except EOFError:
        pass
    assert term.close() == 0
    screen = term.output.decode().replace("\r\n", "\n")
    debug = [json.loads(line[len("debug "):]) for line in screen.splitlines()
             if line.startswith("debug ")]
    assert len(debug) == 2
    first, second = debug
    tokenizer = world["tokenizer"]
    block = media_block(NUM_FRAMES)
    turn1 = tokens.SYSTEM_V1 + f"\n\n### Human: {block}\nWhat moves?\n### Assistant:"
    turn2 = turn1 + f" {first['answer']}\n### Human: Which way?\n### Assistant:"
    assert first["prompt_ids"] == [1] + tokenizer.encode(turn1, add_special_tokens=False)
    assert second["prompt_ids"] == [1] + tokenizer.encode(turn2, add_special_tokens=False)
    assert first["answer"] and second["prompt_tokens"] > first["prompt_tokens"] + 6
    # Each answer was printed (streamed) after "Assistant: ".
    assert f"Assistant: {first['answer']}\n" in screen
    assert f"Assistant: {second['answer']}\n" in screen
    assert "note: no <video> in the question; it goes in front" in screen


def test_cli_bad_input_is_a_message_not_a_traceback(world, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video " * 100)
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"\x89PNG not really")
    base = ["--checkpoint", str(world["ckpt"]), "--query", "What moves?"]
    cases = [
        (["--video", str(tmp_path / "missing.mp4")], "cannot read the video: no such file"),
        (["--video", str(corrupt)], "cannot read the video: cannot decode it"),
        (["--image", str(bad_image)], "cannot read the image: cannot decode it"),
        (["--video", world["video"], "--query", "red " * 400],
         f"tokens and the model's context {CONTEXT}: ask a shorter question"),
        (["--video", world["video"], "--query", "<video> and <image>"], "more than one media"),
        (["--video", world["video"], "--query", "x", "--top-p", "0"], "sampling:"),
    ]
    for args, message in cases:
        assert chat.main(base + args) == 1, args
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after any note
        assert last.startswith("error: ") and message in last, (args, last)
    assert chat.main(["--checkpoint", str(tmp_path), "--video", world["video"]]) == 1
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # no media at all: argparse's usage message
        chat.main(["--checkpoint", str(world["ckpt"]), "--query", "<video> What?"])
    assert exit_.value.code == 2 and "one of the arguments --video --image is required" in (
        capsys.readouterr().err)

    # As a program: exit status 1, the message, no traceback.
    run = subprocess.run(chat_command(world, "--video", str(tmp_path / "missing.mp4"), "--json",
                                      "--query", "q"), capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: cannot read the video: no such file")
    assert "Traceback" not in run.stderr
