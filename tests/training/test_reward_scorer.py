"""A reward-model directory as a GRPO reward function (issue 33): its scores of (prompt, completion) texts
equal the trained recipe's scores of the same pairs' rows."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402
from preference_helpers import PAIRS, write_jsonl  # noqa: E402

from lightning_tune.data import PreferenceDataModule  # noqa: E402
from lightning_tune.recipes import RewardModel  # noqa: E402
from lightning_tune.training.reward_scorer import RewardModelScorer  # noqa: E402


def test_scores_texts_as_the_recipe_scores_their_rows(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_hf_llama().save_pretrained(base)
    write_tiny_tokenizer(base)
    module = RewardModel(checkpoint_dir=str(base), tokenizer_path=str(base), method="full", export=False)
    module.configure_model()
    with torch.no_grad():
        module.head.score.weight.normal_(generator=torch.Generator().manual_seed(5))
    module.save_merged(tmp_path / "rm")
    data = PreferenceDataModule(
        source=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), tokenizer_path=str(base), max_seq_len=32, batch_size=len(PAIRS), shuffle=False, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    with torch.no_grad():
        expected = module.rewards(next(iter(data.train_dataloader())))  # [chosen of each pair; rejected of each pair]

    scorer = RewardModelScorer(tmp_path / "rm", batch_size=3)  # batches of 3: padding differs from the recipe's batch
    prompts = [pair["prompt"] for pair in PAIRS] * 2
    completions = [pair["chosen"] for pair in PAIRS] + [[{"role": "assistant", "content": pair["rejected"]}] for pair in PAIRS]
    scores = scorer(prompts=prompts, completions=completions, completion_ids=None)
    assert len(scores) == 8 and max(scores) - min(scores) > 0.1
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-5)  # same weights (fp32 file), other padding


def test_grpo_takes_a_reward_model_directory_as_a_reward_function(tmp_path: Path) -> None:
    """`reward_funcs: [path/to/rm]` scores with the reward model, named after its folder."""
    from lightning_tune.training.rewards import resolve_reward_funcs, score

    base = tmp_path / "base"
    tiny_hf_llama().save_pretrained(base)
    write_tiny_tokenizer(base)
    module = RewardModel(checkpoint_dir=str(base), tokenizer_path=str(base), method="full", export=False)
    module.configure_model()
    with torch.no_grad():
        module.head.score.weight.normal_(generator=torch.Generator().manual_seed(5))
    module.save_merged(tmp_path / "my_rm")
    [(name, func)] = resolve_reward_funcs([str(tmp_path / "my_rm")], max_completion_len=8)
    assert name == "my_rm" and isinstance(func, RewardModelScorer)
    prompts, completions = [PAIRS[0]["prompt"]] * 2, [PAIRS[0]["chosen"], PAIRS[0]["rejected"]]
    table = score([(name, func)], prompts, completions, [[1], [2]], {})
    assert [row[0] for row in table] == RewardModelScorer(tmp_path / "my_rm")(prompts=prompts, completions=completions)
