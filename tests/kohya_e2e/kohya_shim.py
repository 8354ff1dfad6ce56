"""Run a real sd-scripts trainer on the tiny offline SD1 or SDXL fixture (executed by the kohya virtualenv's python).

    python kohya_shim.py SD_SCRIPTS_DIR [--launcher] [--no-hook] SCRIPT.py [kohya arguments...]

Before sd-scripts is imported it:

* defines the two torchvision op schemas (``torchvision::nms``, ``torchvision::qnms``) when torchvision's
  compiled ops do not load beside a CPU torch from another build: sd-scripts imports torchvision's transforms,
  which register fake kernels for these ops at import, and never calls them;
* shrinks sd-scripts' own SD1 U-Net (``library/original_unet.py`` builds it from module constants) to the
  fixture's widths (``fixture.UNET``), so the diffusers U-Net in the fixture's folder loads into it;
* for an ``sdxl_*.py`` script, shrinks sd-scripts' SDXL U-Net, text encoders and VAE (:func:`shrink_sdxl`) to
  ``fixture.SDXL``, so the fixture's single-file SDXL checkpoint loads through sd-scripts' own loader; for a
  ``flux_*.py`` script, its Flux model, CLIP-L, T5-XXL and autoencoder (:func:`shrink_flux`) to ``fixture.FLUX``.

Then it runs the script as ``__main__`` (kohya's own entry point, our hook attaching by itself) or, with
``--launcher``, through ``sd-hina-train`` (``sd_hina_plugin.kohya.launcher.main``). ``--no-hook`` disables
our kohya hook, to show that the tests' TensorBoard checks fail without it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def shrink_unet() -> None:
    from fixture import UNET

    import library.original_unet as ou

    channels = tuple(UNET["block_out_channels"])
    ou.BLOCK_OUT_CHANNELS = channels
    ou.TIMESTEP_INPUT_DIM = channels[0]
    ou.TIME_EMBED_DIM = channels[0] * 4
    ou.LAYERS_PER_BLOCK = UNET["layers_per_block"]
    ou.LAYERS_PER_BLOCK_UP = UNET["layers_per_block"] + 1
    ou.NORM_GROUPS = UNET["norm_num_groups"]
    ou.TRANSFORMER_NORM_NUM_GROUPS = UNET["norm_num_groups"]


def shrink_sdxl() -> None:
    """Shrink sd-scripts' SDXL models to the fixture's ``fixture.SDXL`` sizes: the constants its U-Net is built from
    (``library/sdxl_original_unet.py``), the depth and cross-attention width its U-Net hard-codes in each
    ``Transformer2DModel(...)`` call (a subclass of the same name forces them, so that LoRA still finds its target
    modules by class name), the two ``CLIPTextConfig(...)`` calls of its single-file loader
    (``library/sdxl_model_util.py``: told apart by their hidden size, 768 and 1280) and its VAE constants
    (``library/model_util.py``). The single-file checkpoint format, its key conversions and every training code
    path stay sd-scripts' own."""
    from fixture import SDXL

    import library.model_util as mu
    import library.sdxl_model_util as sm
    import library.sdxl_original_unet as su

    if getattr(su, "_tiny", False):
        return
    su._tiny = True
    channels = SDXL["model_channels"]
    su.MODEL_CHANNELS = channels
    su.TIME_EMBED_DIM = channels * 4
    su.CONTEXT_DIM = SDXL["te1"]["hidden_size"] + SDXL["te2"]["hidden_size"]  # the two text encoders' states side by side
    su.ADM_IN_CHANNELS = SDXL["te2"]["projection_dim"] + 6 * 256  # pooled text embedding + six 256-wide size embeddings

    class Transformer2DModel(su.Transformer2DModel):  # same class name: networks/lora.py targets it by name
        def __init__(self, *args, **kwargs):
            kwargs["num_transformer_layers"] = SDXL["transformer_layers"]
            kwargs["cross_attention_dim"] = su.CONTEXT_DIM
            super().__init__(*args, **kwargs)

    su.Transformer2DModel = Transformer2DModel
    config = sm.CLIPTextConfig

    def tiny_text_config(**kwargs):
        kwargs.update(SDXL["te1"] if kwargs.get("hidden_size") == 768 else SDXL["te2"])
        return config(**kwargs)

    sm.CLIPTextConfig = tiny_text_config
    mu.VAE_PARAMS_CH = SDXL["vae_channels"]
    mu.VAE_PARAMS_CH_MULT = [1, 1, 1, 1]
    mu.VAE_PARAMS_NUM_RES_BLOCKS = 1


def shrink_flux() -> None:
    """Shrink sd-scripts' Flux models to ``fixture.FLUX``: the dev/schnell ``ModelSpec`` params of
    ``library/flux_models.py`` (widths; the block counts come from the checkpoint, as sd-scripts reads them), the
    ``CLIPConfig(...)`` and ``T5Config(...)`` calls of ``library/flux_utils.py``'s CLIP-L and T5-XXL loaders, and the
    autoencoder's widths."""
    from dataclasses import replace

    from fixture import FLUX

    import library.flux_models as fm
    import library.flux_utils as fu

    if getattr(fm, "_tiny", False):
        return
    fm._tiny = True
    for name, spec in list(fm.configs.items()):
        params = replace(spec.params, vec_in_dim=FLUX["clip_l"]["hidden_size"], context_in_dim=FLUX["t5"]["d_model"],
                         **FLUX["flux"])
        ae = replace(spec.ae_params, **FLUX["ae"]) if spec.ae_params is not None else None
        fm.configs[name] = replace(spec, params=params, ae_params=ae)
    clip_config, t5_config = fu.CLIPConfig, fu.T5Config

    def tiny_clip_config(**kwargs):
        return clip_config(**{**kwargs, **FLUX["clip_l"]})

    def tiny_t5_config(**kwargs):
        return t5_config(**{**kwargs, **FLUX["t5"]})

    fu.CLIPConfig, fu.T5Config = tiny_clip_config, tiny_t5_config


def main(argv: list[str]) -> None:
    sd_scripts, rest = Path(argv[0]).resolve(), argv[1:]
    flags = set()
    while rest and rest[0] in ("--launcher", "--no-hook"):
        flags.add(rest.pop(0))
    launcher = "--launcher" in flags
    script = (sd_scripts / rest[0]).resolve()
    sys.path.insert(0, str(sd_scripts))
    sys.path.insert(0, str(Path(__file__).parent))
    from fixture import define_torchvision_ops

    define_torchvision_ops()
    shrink_unet()
    if Path(rest[0]).name.startswith("sdxl_"):
        shrink_sdxl()
    if Path(rest[0]).name.startswith("flux_"):
        shrink_flux()
    if "--no-hook" in flags:  # for the test that shows a broken hook fails the TensorBoard check
        import sd_hina_plugin.engine.base as base

        base.attach_to_kohya = lambda optimizer: None
    if launcher:
        from sd_hina_plugin.kohya.launcher import main as launch

        raise SystemExit(launch([str(script), *rest[1:]]))
    sys.argv = [str(script), *rest[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
