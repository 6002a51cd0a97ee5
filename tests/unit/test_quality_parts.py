"""A reduced scoring on the committed world models (issue 17: CI scores, never trains): the quality parts added
for instruction editing and the denoiser diagnostics run end to end on one or two evaluation seeds and give
well-formed figures; the parts without trained weights say what is missing."""
import math

import pytest

from devtools import tiny_sdxl


@pytest.fixture(scope="module", autouse=True)
def host_importable():
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_the_editing_part_scores_one_seed_for_every_method():
    from bench import _quality_editing
    figures, samples = _quality_editing.run(1)
    assert figures["n_seeds"] == 1 and 0.0 <= figures["vlm_target_prompt_correct_rate"] <= 1.0
    for method in ("instruction", "p2p_true_prompts", "img2img"):
        for rate in ("edit_success_rate", "colour_in_mask_rate"):
            assert figures[f"{method}_{rate}"] in (0.0, 1.0)
        psnr = figures[f"{method}_background_psnr_db"]
        assert psnr == float("inf") or 5.0 < psnr < 100.0, (method, psnr)
    assert len(samples) == 3 and all(image.shape == (128, 128, 3) for _, image in samples)


def test_the_denoiser_diagnostics_measure_the_texts_effect_per_timestep():
    from bench._quality_t2i import denoiser_diagnostics
    figures = denoiser_diagnostics(8, timesteps=(999, 100))
    assert set(figures) == {f"denoiser_{name}_t{t}" for t in (999, 100) for name in (
        "text_effect", "x0_error_over_variance", "x0_error_over_variance_wrong_caption")}
    assert all(math.isfinite(v) and v >= 0 for v in figures.values())
    # at t 100 the clean latent is nearly given: any trained denoiser recovers it far better than at t 999
    assert figures["denoiser_x0_error_over_variance_t100"] < figures["denoiser_x0_error_over_variance_t999"]
    # at t 999 only the caption tells the scene: another scene's caption predicts it worse
    assert figures["denoiser_x0_error_over_variance_t999"] < figures["denoiser_x0_error_over_variance_wrong_caption_t999"]


def test_the_parts_without_trained_weights_say_what_is_missing():
    from bench import _quality_mmsm, _quality_mumu
    for part, folder in ((_quality_mumu, "mumu"), (_quality_mmsm, "mmsm")):
        figures, samples = part.run(50)
        assert figures["n_seeds"] == 0 and samples == []
        assert figures["skipped"].startswith("skipped: ") and folder in figures["skipped"]
