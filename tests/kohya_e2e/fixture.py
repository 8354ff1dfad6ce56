"""Tiny, randomly initialised SD1, SDXL and Flux models for the real-kohya tests, built offline (executed by the kohya
virtualenv's python: sd-scripts' pinned diffusers and transformers write it).

    python fixture.py OUT_DIR
    python fixture.py --sdxl OUT_DIR SD_SCRIPTS_DIR
    python fixture.py --flux OUT_DIR SD_SCRIPTS_DIR

writes ``OUT_DIR/model`` (a diffusers StableDiffusionPipeline folder: CLIP text encoder, VAE, U-Net, DDPM
scheduler), ``OUT_DIR/tokenizers/openai_clip-vit-large-patch14`` (a CLIP tokenizer over a byte-level vocabulary,
found by sd-scripts through ``--tokenizer_cache_dir OUT_DIR/tokenizers``) and ``OUT_DIR/train/1_tiny`` (a
DreamBooth-style folder: eight 64x64 images with ``.txt`` captions, one repeat) and ``OUT_DIR/train_same``
(the same with eight copies of one picture, for the resume test). With ``--sdxl`` it writes the SDXL fixture
instead (:func:`build_sdxl`): ``OUT_DIR/sdxl.safetensors``, a single-file SDXL checkpoint written by
sd-scripts' own code from its SDXL classes shrunk to ``SDXL`` (:func:`write_sdxl`), both SDXL tokenizers and the
same pictures. With ``--flux`` the Flux fixture (:func:`build_flux`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: the U-Net's widths; kohya_shim.py shrinks sd-scripts' own U-Net to the same
UNET = {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16,
        "cross_attention_dim": 32, "attention_head_dim": 4}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
IMAGES = 8
#: the SDXL model's sizes; kohya_shim.shrink_sdxl shrinks sd-scripts' SDXL classes and loader to them (its U-Net:
#: 32/64/128 channels, one transformer layer per attention block; the text encoders' vocabulary is the fixture
#: tokenizer's, see write_tokenizer)
SDXL = {"model_channels": 32, "transformer_layers": 1, "vae_channels": 32,
        # twelve layers as SDXL's: sd-scripts takes the first text encoder's hidden_states[11]
        "te1": {"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
                "projection_dim": 32},
        "te2": {"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "projection_dim": 32}}

#: the Flux model's sizes; kohya_shim.shrink_flux shrinks sd-scripts' Flux classes and loaders to them (the
#: numbers of double and single blocks sd-scripts reads from the checkpoint)
FLUX = {"flux": {"hidden_size": 64, "num_heads": 2, "axes_dim": [8, 12, 12]}, "double_blocks": 2, "single_blocks": 2,
        "ae": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1},
        "clip_l": {"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "projection_dim": 32},
        "t5": {"vocab_size": 192, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2}}


def define_torchvision_ops() -> None:
    """Define ``torchvision::nms`` and ``qnms`` when torchvision's compiled ops do not load beside this torch
    (PyPI's torchvision with the local CPU torch): importing torchvision registers fake kernels for them and
    fails without their schemas; neither sd-scripts nor diffusers calls them."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018  (the compiled ops loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # kept alive for the process
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    define_torchvision_ops.lib = lib


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte-to-character table (printable bytes as themselves, the rest shifted past 255)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def write_tokenizer(folder: Path) -> int:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return len(vocab)


def write_model(folder: Path, vocab_size: int, tokenizer_dir: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                                                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **TEXT))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=16, sample_size=64)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **UNET)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))


def write_sdxl(path: Path, sd_scripts: Path) -> None:
    """A single-file SDXL checkpoint (``model.diffusion_model.*``, ``conditioner.embedders.0/1.*``,
    ``first_stage_model.*``), written by sd-scripts' own ``sdxl_model_util.save_stable_diffusion_checkpoint`` from
    its own SDXL U-Net, shrunk to ``SDXL`` by ``kohya_shim.shrink_sdxl`` as in the training runs."""
    import torch

    sys.path.insert(0, str(sd_scripts))
    from kohya_shim import shrink_sdxl

    shrink_sdxl()
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    import library.model_util as mu
    import library.sdxl_model_util as sm
    import library.sdxl_original_unet as su

    torch.manual_seed(0)
    unet = su.SdxlUNet2DConditionModel()
    # the same configs as sd-scripts' loader builds (its CLIPTextConfig calls, shrunk)
    te1 = CLIPTextModel(sm.CLIPTextConfig(hidden_size=768, max_position_embeddings=77, hidden_act="quick_gelu", pad_token_id=1,
                                          bos_token_id=0, eos_token_id=2))
    te2 = CLIPTextModelWithProjection(sm.CLIPTextConfig(hidden_size=1280, max_position_embeddings=77, hidden_act="gelu",
                                                        pad_token_id=1, bos_token_id=0, eos_token_id=2))
    vae = AutoencoderKL(**mu.create_vae_diffusers_config())
    sm.save_stable_diffusion_checkpoint(str(path), te1, te2, unet, 0, 0, None, vae, None, None)


def write_images(folder: Path, same: bool = False) -> None:
    """Striped pictures with captions; ``same``: every picture and caption the first one's."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = np.random.default_rng(0).uniform(0.2, 1.0, size=(IMAGES, 3))
    for i in range(IMAGES):
        k = 0 if same else i
        y, x = np.mgrid[0:64, 0:64]
        stripes = ((x + y * (k % 3)) // (4 + k) % 2).astype(np.float32)
        image = (stripes[..., None] * colours[k] * 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a tiny striped picture number {k}")


def build(out: Path) -> Path:
    define_torchvision_ops()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizers" / "openai_clip-vit-large-patch14"
    vocab_size = write_tokenizer(tokenizer_dir)
    write_model(out / "model", vocab_size, tokenizer_dir)
    write_images(out / "train" / "1_tiny")
    # for the resume test: kohya reshuffles its buckets once per epoch skipped on --resume, so the data order
    # after a resume differs from an uninterrupted run's; with identical pictures the order does not matter
    write_images(out / "train_same" / "1_same", same=True)
    return out


def build_sdxl(out: Path, sd_scripts: Path) -> Path:
    """The SDXL fixture: ``OUT_DIR/sdxl.safetensors``, both SDXL tokenizers under ``OUT_DIR/tokenizers`` (the same
    byte-level one twice; sd-scripts sets the second one's pad token id to 0 itself) and ``OUT_DIR/train/1_tiny``."""
    define_torchvision_ops()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        assert write_tokenizer(out / "tokenizers" / name) == SDXL["te1"]["vocab_size"] == SDXL["te2"]["vocab_size"]
    write_sdxl(out / "sdxl.safetensors", sd_scripts)
    write_images(out / "train" / "1_tiny")
    return out


def write_t5_tokenizer(folder: Path) -> int:
    """A T5 tokenizer (sentencepiece-style unigram over printable ASCII, ``</s>`` appended), saved as
    ``T5TokenizerFast`` as sd-scripts loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in chars] \
        + [("\u2581" + c, -1.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                                model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def build_flux(out: Path, sd_scripts: Path) -> Path:
    """The Flux fixture (BFL single files, as sd-scripts' Flux scripts take them): ``OUT_DIR/flux.safetensors``
    (the flow model, dev: with guidance embedding), ``clip_l.safetensors``, ``t5xxl.safetensors``,
    ``ae.safetensors``; the CLIP-L and T5 tokenizers (also as a hub cache under ``OUT_DIR/hub``); the pictures. Built from sd-scripts' own classes shrunk by
    ``kohya_shim.shrink_flux``."""
    import torch
    from safetensors.torch import save_file

    define_torchvision_ops()
    out.mkdir(parents=True, exist_ok=True)
    assert write_tokenizer(out / "tokenizers" / "openai_clip-vit-large-patch14") == FLUX["clip_l"]["vocab_size"]
    assert write_t5_tokenizer(out / "tokenizers" / "google_t5-v1_1-xxl") == FLUX["t5"]["vocab_size"]
    # flux_train.py builds its FluxTokenizeStrategy without --tokenizer_cache_dir, so it asks the hub for both
    # tokenizers: the same files in a hub cache layout (the tests run it with HF_HUB_CACHE=OUT_DIR/hub, offline)
    for repo, name in (("openai/clip-vit-large-patch14", "openai_clip-vit-large-patch14"), ("google/t5-v1_1-xxl", "google_t5-v1_1-xxl")):
        cache = out / "hub" / ("models--" + repo.replace("/", "--"))
        snapshot = cache / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text("0" * 40)
        for file in (out / "tokenizers" / name).iterdir():
            (snapshot / file.name).write_bytes(file.read_bytes())
    sys.path.insert(0, str(sd_scripts))
    from kohya_shim import shrink_flux

    shrink_flux()
    from dataclasses import replace

    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    import library.flux_models as fm
    import library.flux_utils as fu

    torch.manual_seed(0)
    spec = fm.configs[fu.MODEL_NAME_DEV]
    flux = fm.Flux(replace(spec.params, depth=FLUX["double_blocks"], depth_single_blocks=FLUX["single_blocks"]))
    ae = fm.AutoEncoder(spec.ae_params)
    clip = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", max_position_embeddings=77, pad_token_id=1, bos_token_id=0,
                                        eos_token_id=2, **FLUX["clip_l"]))  # the keys of sd-scripts' CLIPConfig build
    t5 = T5EncoderModel(fu.T5Config(feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new", pad_token_id=0,
                                    eos_token_id=1, relative_attention_num_buckets=32, relative_attention_max_distance=128))
    for name, model in (("flux", flux), ("ae", ae), ("clip_l", clip), ("t5xxl", t5)):
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    write_images(out / "train" / "1_tiny")
    return out


def write_flux_model(path: Path, sd_scripts: Path, double_blocks: int, single_blocks: int) -> None:
    """Only the flow model of the Flux fixture, with other block counts (``--blocks_to_swap`` needs at least
    two blocks of each kind left on the device); it goes with the CLIP-L, T5 and autoencoder of ``--flux``."""
    from dataclasses import replace

    import torch
    from safetensors.torch import save_file

    define_torchvision_ops()
    sys.path.insert(0, str(sd_scripts))
    from kohya_shim import shrink_flux

    shrink_flux()
    import library.flux_models as fm
    import library.flux_utils as fu

    torch.manual_seed(0)
    flux = fm.Flux(replace(fm.configs[fu.MODEL_NAME_DEV].params, depth=double_blocks, depth_single_blocks=single_blocks))
    save_file({k: v.detach().clone().contiguous() for k, v in flux.state_dict().items()}, str(path))


def read_scalars(logdir: Path) -> dict[str, list[float]]:
    """Every scalar of the TensorBoard event files under ``logdir``: tag -> values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for path in sorted(logdir.rglob("*tfevents*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--scalars":  # for the tests, whose own venv may lack tensorboard
        print(json.dumps(read_scalars(Path(sys.argv[2]))))
    elif sys.argv[1] == "--flux":
        print(build_flux(Path(sys.argv[2]), Path(sys.argv[3])))
    elif sys.argv[1] == "--flux-model":  # PATH SD_SCRIPTS DOUBLE SINGLE: a flow model alone, with more blocks
        write_flux_model(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "--sdxl":
        print(build_sdxl(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        print(build(Path(sys.argv[1])))
