"""Chat about an image in the terminal with a trained unified model.

    python scripts/chat.py --image photo.png [--model outputs/demo/mllm/model]

Type a question and the answer streams as it is decoded; every turn stays in the prompt of the next one.
Commands: /image PATH switches to another image (and starts over), /reset forgets the turns, /quit ends
(as does end of input). Answers are greedy unless --temperature is given. Answers go to stdout, one line each;
notices and errors go to stderr, so piped questions give a file of answers. A bad question or image is
reported as one line and the chat goes on; a bad start ends with exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae.cli import Parser, UsageError, check_model_arg, one_line  # noqa: E402

DEFAULT_MODEL = "outputs/demo/mllm/model"  # where scripts/run_demo.sh leaves the unified model (as scripts/generate.py)
HELP = "commands: /image PATH (new image, new conversation), /reset (forget the turns), /quit"


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--image", required=True, metavar="PATH", help="the image to talk about")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a saved unified model directory (default {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens; 0 = off (the default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; 1 = off (the default)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampled answers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="LLM weights; auto = the saved dtype on CUDA, float32 on CPU")
    return p.parse_args(argv)


def _notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



def _ask(model, conversation, question: str, args, sampling) -> None:
    """Stream one answer to stdout and record the turn; Ctrl-C drops the unfinished answer."""
    from mllm.chat import stream_answer

    pieces = []
    try:
        stream = stream_answer(model, conversation, question, max_new_tokens=args.max_new_tokens, sampling=sampling)
        for piece in stream:
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(flush=True)
        _notice("(answer interrupted; not kept)")
        return
    print(flush=True)
    conversation.add(question, "".join(pieces))


def chat(model, conversation, args, sampling, lines) -> None:
    """The loop: one question or command per line of ``lines`` until /quit or the end of input."""
    from mllm.chat import read_chat_image, start_conversation

    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = next(lines, None)
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command == "/quit":
                return
            if command == "/reset":
                conversation.reset()
                _notice("(conversation reset)")
            elif command == "/image":
                conversation = start_conversation(model, read_chat_image(rest.strip()))
                _notice(f"(new image: {rest.strip()})")
            elif command.startswith("/"):
                _notice(f"unknown command '{command}'; {HELP}")
            else:
                _ask(model, conversation, line, args, sampling)
        except ValueError as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)


def _lines():
    try:
        for line in sys.stdin:
            yield line
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat like /quit
        return


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        check_model_arg(args.model, DEFAULT_MODEL)
        # Heavy imports only now: bad arguments fail above in a fraction of a second.
        import torch
        from transformers.utils import logging as hf_logging

        from mllm.chat import read_chat_image, start_conversation
        from mllm.inference import load_model
        from mllm.sampling import answer_sampling, flag_settings

        hf_logging.set_verbosity_error()
        given = flag_settings(vars(args), {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p"})
        sampling = answer_sampling(seed=args.seed, **given)
        image = read_chat_image(args.image)  # before the model load: a bad file fails fast
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, device, None if args.dtype == "auto" else args.dtype)
        conversation = start_conversation(model, image)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        _notice(HELP)
    chat(model, conversation, args, sampling, _lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
