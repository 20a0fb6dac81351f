"""The built-in digits testbed: a tiny SDXL teacher, a reward and an evaluator, trained here on scikit-learn's digits.

It is the data behind `make demo` and `make reproduce`; see `docs/digits.md`. Build (or reuse from the cache) with
`build_testbed()` or `python -m diffusers_dmdr.digits`.
"""

from .build import (
    DIGITS_TESTBED_VERSION,
    TEACHER_GATE_ACCURACY,
    TEACHER_GUIDANCE_SCALE,
    TEACHER_NUM_INFERENCE_STEPS,
    DigitsBuildSettings,
    DigitsTestbed,
    build_testbed,
    default_cache_dir,
    load_eval_classifier,
    load_real_digits,
)
from .classifiers import EvalDigitNet, RewardDigitNet, extract_features, predict_digits, train_classifier
from .data import (
    DIGIT_WORDS,
    DIGITS_RESOLUTION,
    PROMPT_TEMPLATES,
    all_prompts,
    digit_prompt,
    load_digit_images,
    load_digit_splits,
    parse_digit,
    split_indices,
    write_prompts_file,
)
from .metrics import (
    evaluate_digits,
    frechet_distance,
    frechet_distance_from_moments,
    knn_precision_recall,
    mean_pairwise_distance,
    per_prompt_diversity,
)
from .reward import DigitClassifierReward, load_reward_classifier
from .sampling import DigitSamples, sample_digits


__all__ = [
    "DIGITS_RESOLUTION",
    "DIGITS_TESTBED_VERSION",
    "DIGIT_WORDS",
    "PROMPT_TEMPLATES",
    "TEACHER_GATE_ACCURACY",
    "TEACHER_GUIDANCE_SCALE",
    "TEACHER_NUM_INFERENCE_STEPS",
    "DigitClassifierReward",
    "DigitSamples",
    "DigitsBuildSettings",
    "DigitsTestbed",
    "EvalDigitNet",
    "RewardDigitNet",
    "all_prompts",
    "build_testbed",
    "default_cache_dir",
    "digit_prompt",
    "evaluate_digits",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_moments",
    "knn_precision_recall",
    "load_digit_images",
    "load_digit_splits",
    "load_eval_classifier",
    "load_real_digits",
    "load_reward_classifier",
    "mean_pairwise_distance",
    "parse_digit",
    "per_prompt_diversity",
    "predict_digits",
    "sample_digits",
    "split_indices",
    "train_classifier",
    "write_prompts_file",
]
