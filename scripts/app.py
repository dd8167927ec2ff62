"""A web app for a trained unified model: draw images from a caption, and chat about an image.

    python scripts/app.py [--model outputs/demo/mllm/model] [--port 7860] [--host 127.0.0.1]

Then open http://127.0.0.1:7860. The model is loaded once; requests wait in one queue and run one at a time
(drawing and answering share the model). Draw: a caption, an optional negative prompt (what the unconditional
branch of guidance reads instead of the empty caption), images, guidance, temperature (a greedy button sets it
to 0), top-k, top-p, the decoding (autoregressive or speculative Jacobi) and a seed (or a random one, shown after
the run); the controls start at the model's saved sampling defaults; each image is captioned with its seed and the seconds it took, and
downloads as a PNG. Ask: upload an image (or pick one of the held-out demo images when data/shapes/test
exists) and ask questions; every turn stays in the prompt of the next, and answers stream as they are decoded.
Bad input is a message in the page; the app goes on serving. Needs the ``app`` extra: pip install -e ".[app]".
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae.cli import Parser, UsageError, check_model_arg, one_line  # noqa: E402

DEFAULT_MODEL = "outputs/demo/mllm/model"  # where scripts/run_demo.sh leaves the unified model (as scripts/generate.py)
DEMO_IMAGES = "data/shapes/test"  # the demo's held-out images, offered as examples on the Ask tab
MAX_IMAGES = 16  # images per Draw request: the queue is shared, one request should not hold it for long
MAX_CFG = 20.0  # the guidance slider's end: beyond it guidance only saturates the logits
MAX_TEMPERATURE = 5.0  # the temperature slider's end
MAX_UPLOAD = "50mb"  # refused by the server before the file is read; pixels are limited in mllm.chat
SEED_LIMIT = 2**31


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a saved unified model directory (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--examples", default=DEMO_IMAGES, help=f"folder of example images for Ask (default {DEMO_IMAGES})")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="LLM weights; auto = the saved dtype on CUDA, float32 on CPU")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- request handlers


def _text(content) -> str:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


class Handlers:
    """What the page's buttons run, over one loaded model."""

    def __init__(self, model, max_new_tokens: int) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens

    def draw(self, prompt, negative, num_images, guidance, temperature, top_k, top_p, seed, random_seed,
             decoding="autoregressive", progress=None):
        """Images one at a time from one seeded generator; yields (gallery, seed) as each is decoded. The page's
        controls keep values within their ranges; ``SamplingConfig`` checks the settings."""
        import gradio as gr
        import torch

        from mllm.inference import build_generation_prompts, generate_images, to_uint8

        prompt, negative = (prompt or "").strip(), (negative or "").strip()
        if not prompt:
            raise gr.Error("the prompt is empty: describe the image to draw")
        if num_images is None or num_images != int(num_images) or not 1 <= num_images <= MAX_IMAGES:
            raise gr.Error(f"number of images must be a whole number from 1 to {MAX_IMAGES}, got {num_images}")
        if random_seed or seed is None:
            seed = random.SystemRandom().randrange(SEED_LIMIT)
        if seed != int(seed) or not 0 <= seed < SEED_LIMIT:
            raise gr.Error(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")
        seed, num_images = int(seed), int(num_images)
        try:
            sampling = self.model.sampling_config(  # bad settings, and options that cannot combine, fail here
                seed=seed, cfg_scale=guidance, temperature=temperature, top_k=top_k, top_p=top_p, decoding=decoding,
            )
            build_generation_prompts(self.model, [prompt], negative or None)  # a too-long prompt fails here
        except ValueError as e:
            raise gr.Error(str(e)) from None
        generator = torch.Generator(device=next(self.model.llm.parameters()).device).manual_seed(seed)
        gallery = []
        for i in range(num_images):
            if progress is not None:
                progress((i, num_images), desc=f"drawing image {i + 1} of {num_images}")
            start = time.perf_counter()
            # One generator across the images: the same seed gives the same images as
            # scripts/generate.py --seed S --num-images N --batch-size 1.
            try:  # e.g. a saved Jacobi window longer than this model's images
                out = generate_images(self.model, [prompt], sampling, num_images=1, negative_prompt=negative or None,
                                      batch_size=1, generator=generator)
            except ValueError as e:
                raise gr.Error(str(e)) from None
            seconds = time.perf_counter() - start
            pixels = to_uint8(out.images[0]).permute(1, 2, 0).numpy()  # (H, W, 3)
            gallery.append((pixels, f"{seconds:.2f} s · seed {seed} #{i + 1}"))
            yield gallery, seed

    def ask(self, image_path, question, history):
        """Stream the answer to ``question`` about the image after the turns in ``history`` (chat messages).
        Yields (history with the new turn, cleared question box, status)."""
        import gradio as gr

        from mllm.chat import Conversation, chat_prompt, read_chat_image, start_conversation, stream_answer

        question = (question or "").strip()
        if not image_path:
            raise gr.Error("upload an image first (or pick an example)")
        if not question:
            raise gr.Error("the question is empty")
        history = list(history or [])
        try:
            conversation: Conversation = start_conversation(self.model, read_chat_image(image_path))
            users = [_text(m["content"]) for m in history if m["role"] == "user"]
            answers = [_text(m["content"]) for m in history if m["role"] == "assistant"]
            for q, a in zip(users, answers):
                if a.strip():  # a turn whose answer never came is left out
                    conversation.add(q, a)
            prompt = chat_prompt(self.model, conversation, question, self.max_new_tokens)
            pieces = stream_answer(self.model, conversation, question, max_new_tokens=self.max_new_tokens)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        status = f"turn {len(conversation.turns) + 1} · prompt {len(prompt.input_ids)} tokens"
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for piece in pieces:
            answer += piece
            history[-1] = {"role": "assistant", "content": answer}
            yield history, "", status
        if not answer:
            history[-1] = {"role": "assistant", "content": "(no answer)"}
        yield history, "", status


# ----------------------------------------------------------------------------- page


def _one_line_upload_errors(image) -> None:
    """Gradio opens an upload with PIL before any handler runs, and a file PIL cannot identify would be reported
    as a long internal error; this component reports it as one line instead."""
    import gradio as gr

    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception:  # PIL raises many types for files that are not images
            raise gr.Error("cannot use this image: not an image file PIL can read") from None

    image.preprocess = checked


def _examples(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*.jpg")))[:12]


def build_app(model, max_new_tokens: int = 256, examples_dir: str = DEMO_IMAGES):
    """The page: a Draw tab and an Ask tab over ``model``; both events share one queue slot."""
    import gradio as gr

    from mllm.sampling import DECODINGS

    handlers = Handlers(model, max_new_tokens)
    defaults = model.sampling_config()

    def draw(prompt, negative, num_images, guidance, temperature, top_k, top_p, seed, random_seed, decoding,
             progress=gr.Progress()):
        yield from handlers.draw(prompt, negative, num_images, guidance, temperature, top_k, top_p, seed,
                                 random_seed, decoding, progress)

    with gr.Blocks(title="VQRAE") as demo:
        gr.Markdown("## VQRAE: draw an image from a caption, or ask about an image")
        with gr.Tab("Draw"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="prompt", elem_id="draw-prompt",
                                        placeholder="a small blue star at the top left on a gray background")
                    negative = gr.Textbox(label="negative prompt (optional)", elem_id="draw-negative")
                    with gr.Row():
                        num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images")
                        guidance = gr.Slider(0, MAX_CFG, value=defaults.cfg_scale, step=0.1, label="guidance")
                    with gr.Row():
                        # Several images per request: a model saved greedy (temperature 0) would draw one image
                        # n times, so the page starts at temperature 1 for it; the greedy button is one click.
                        temperature = gr.Slider(0, MAX_TEMPERATURE, value=defaults.temperature or 1.0, step=0.05,
                                                label="temperature (0 = greedy)", elem_id="draw-temperature")
                        top_k = gr.Number(value=defaults.top_k, precision=0, minimum=0, label="top-k (0 = off)")
                        top_p = gr.Slider(0.01, 1, value=defaults.top_p, step=0.01, label="top-p (1 = off)")
                    with gr.Row():
                        # The model's saved defaults sample; greedy draws one image per prompt whatever the seed.
                        greedy = gr.Button("greedy (temperature 0)", size="sm", elem_id="draw-greedy")
                        decoding = gr.Radio(list(DECODINGS), value=defaults.decoding, elem_id="draw-decoding",
                                            label="decoding (jacobi: the same images' distribution, fewer forwards)")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="draw-seed")
                        random_seed = gr.Checkbox(value=True, label="random seed (the drawn one is shown)")
                    draw_button = gr.Button("Draw", variant="primary", elem_id="draw-button")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="images", format="png", columns=4, elem_id="gallery",
                                         buttons=["download", "fullscreen"])
            greedy.click(lambda: 0.0, None, temperature, api_name=False)
            draw_inputs = [prompt, negative, num_images, guidance, temperature, top_k, top_p, seed, random_seed, decoding]
            gr.on([draw_button.click, prompt.submit], draw, draw_inputs, [gallery, seed], api_name="draw",
                  concurrency_id="model", concurrency_limit=1)
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column(scale=2):
                    image = gr.Image(label="image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     height=320, elem_id="ask-image")
                    _one_line_upload_errors(image)
                    found = _examples(examples_dir)
                    if found:
                        gr.Examples([[p] for p in found], inputs=[image], label="held-out demo images")
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="conversation", height=420, elem_id="chat")
                    question = gr.Textbox(label="question", placeholder="What colour is the shape?", elem_id="question")
                    with gr.Row():
                        ask_button = gr.Button("Ask", variant="primary", elem_id="ask-button")
                        clear = gr.Button("New conversation")
                    status = gr.Markdown("", label="status")
            gr.on([ask_button.click, question.submit], handlers.ask, [image, question, chatbot],
                  [chatbot, question, status], api_name="ask", concurrency_id="model", concurrency_limit=1)
            clear.click(lambda: ([], ""), None, [chatbot, status], api_name=False)
            image.change(lambda: ([], ""), None, [chatbot, status], api_name=False)  # a new image, a new conversation
    return demo


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if not 0 < args.port < 65536:
            raise UsageError(f"--port must be in 1..65535, got {args.port}")
        check_model_arg(args.model, DEFAULT_MODEL)
        # Usage statistics would be sent to gradio's servers; an offline machine would only wait on them.
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        try:
            import gradio as gr
        except ImportError:
            raise UsageError('gradio is not installed: pip install -e ".[app]"') from None
        import torch
        from transformers.utils import logging as hf_logging

        from mllm.inference import load_model

        hf_logging.set_verbosity_error()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, device, None if args.dtype == "auto" else args.dtype)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    demo = build_app(model, args.max_new_tokens, args.examples)
    allowed = [os.path.abspath(args.examples)] if os.path.isdir(args.examples) else None
    # One worker for every event: the model never runs two requests at once.
    demo.queue(default_concurrency_limit=1, max_size=64)
    # System fonts: the default theme's web fonts would be fetched from the internet on every page load.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, max_file_size=MAX_UPLOAD,
                allowed_paths=allowed, footer_links=["api"], quiet=True, theme=theme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
