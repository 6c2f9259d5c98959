"""`rqgen serve`: a browser demo of a trained transformer (Gradio), on localhost.

Pick a class (or write a prompt for a text model), the guidance scale, top-k / top-p, a
seed and how many images; the page shows the samples, one class per row, and how the first
one builds up code depth by code depth (the paper's coarse-to-fine Ẑ(1) … Ẑ(D)). Nothing
is fetched from the internet: the page uses system fonts and no analytics.
"""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw, ImageFont

from rqgen.pipeline import RQPipeline
from rqgen.utils.images import class_rows, enlarge, labelled_row, make_grid, to_pil

ALL_CLASSES = "all classes"


def coarse_to_fine(pipe: RQPipeline, codes: torch.Tensor) -> Image.Image | None:
    """The decodings of Ẑ(1) … Ẑ(D) of one code map, side by side (None for a DQ-VAE, whose
    codes have no depth)."""
    vae = pipe.vae
    if not pipe.family.residual:
        return None
    codes = codes[:1].to(next(vae.parameters()).device)
    depths = range(1, codes.shape[-1] + 1)  # the transformer may model a prefix of D
    with torch.no_grad():
        steps = [vae.decode_codes(codes, d).clamp(-1, 1).cpu() for d in depths]
    labels = [f"depth 1-{d}" if d > 1 else "depth 1" for d in depths]
    return labelled_row(torch.cat(steps), labels, upscale=max(1, 192 // vae.config.resolution))


def sample_grid(out, per_row: int, cell: int = 64) -> Image.Image:
    """The samples as one picture, one class per row (the class name at its left), as
    `rqgen sample` and the demo draw them."""

    names = list(dict.fromkeys(out.names))  # row order: first appearance (class-major input)
    ids = [names.index(n) for n in out.names]
    images, nrow = class_rows(out.pixels, ids) if len(names) > 1 else (out.pixels, per_row)
    grid = enlarge(to_pil(make_grid(images, nrow=nrow)), cell // out.pixels.shape[-1])
    if len(names) == 1:
        return grid
    font, margin = ImageFont.load_default(), 70
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw, row_h = ImageDraw.Draw(canvas), grid.height / len(names)
    for r, name in enumerate(names):
        draw.text((4, (r + 0.5) * row_h - 6), name[:11], fill="black", font=font)
    return canvas


def generate(
    pipe: RQPipeline,
    choice: str,
    prompt: str,
    guidance_scale: float,
    top_k: int,
    top_p: float,
    seed: int,
    n: int,
) -> tuple[Image.Image, Image.Image | None, str]:
    """What the Generate button does: the samples (one class per row), the first one's
    coarse-to-fine strip, and a one-line status."""
    top_k = int(top_k) if top_k and int(top_k) > 0 else None
    top_p = float(top_p) if top_p and float(top_p) < 1.0 else None
    kw = dict(guidance_scale=float(guidance_scale), top_k=top_k, top_p=top_p, seed=int(seed))
    k, n = pipe.model.config.num_classes, int(n)
    if pipe.conditioning == "text":
        out = pipe(prompt=prompt or "a photo", num_images=n, **kw)
    elif pipe.conditioning == "class" and choice != ALL_CLASSES:
        out = pipe(class_labels=[choice], num_images=n, **kw)
    elif pipe.conditioning == "class":  # every class in turn, class-major
        out = pipe(class_labels=sorted(i % k for i in range(n)), **kw)
    else:
        out = pipe(num_images=n, **kw)
    status = f"{len(out.images)} sample(s), seed {seed}, guidance {guidance_scale}"
    return sample_grid(out, per_row=min(n, 8)), coarse_to_fine(pipe, out.codes), status


def build_app(pipe: RQPipeline):
    """The Gradio Blocks app for one pipeline."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    c, text = pipe.model.config, pipe.conditioning == "text"
    with gr.Blocks(title="rqgen") as app:
        gr.Markdown(f"### rqgen: sampling `{pipe.source}`")
        with gr.Row():
            with gr.Column(scale=1):
                classes = bool(c.num_classes) and not text
                choice = gr.Dropdown(
                    [ALL_CLASSES, *pipe.classes], value=ALL_CLASSES, label="class", visible=classes
                )
                prompt = gr.Textbox(label="prompt", value="a photo", visible=text)
                scale = gr.Slider(
                    1.0,
                    8.0,
                    value=2.0 if c.num_classes or text else 1.0,
                    step=0.5,
                    label="guidance scale (1 = off)",
                )
                top_k = gr.Number(value=0, precision=0, label="top-k (0 = all codes)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1 = off)")
                seed = gr.Number(value=0, precision=0, label="seed")
                default_n = min(40, 4 * c.num_classes) if classes else 8  # 4 per class row
                n = gr.Slider(1, 64, value=default_n, step=1, label="number of images")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                gr.Markdown("**Samples**, one class per row")
                gallery = gr.Image(show_label=False, elem_id="samples", format="png")
                gr.Markdown(
                    "**Coarse to fine**: the first sample decoded from its first 1, 2, "
                    "… D codes (Ẑ(1) … Ẑ(D))"
                )
                strip = gr.Image(show_label=False, elem_id="strip", format="png")
        button.click(
            lambda *a: generate(pipe, *a),
            [choice, prompt, scale, top_k, top_p, seed, n],
            [gallery, strip, status],
        )
    return app


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    block: bool = True,
):
    """Load the model and start the app; returns (app, url) when not blocking."""
    import gradio as gr

    pipe = RQPipeline.from_pretrained(model, device=device)
    app = build_app(pipe)
    theme = gr.themes.Default(
        font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        prevent_thread_lock=True,
        ssr_mode=False,
        theme=theme,
        footer_links=[],
    )
    print(f"rqgen: serving {model} at http://{host}:{port} (Ctrl-C stops it)", flush=True)
    if block:
        app.block_thread()
    return app, url
