import pathlib


def test_tiny_models_build_and_load(tiny_llama_dir: pathlib.Path, tiny_gpt2_dir: pathlib.Path, tiny_reward_dir: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for folder in (tiny_llama_dir, tiny_gpt2_dir):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.get_output_embeddings() is not None
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)
    assert reward.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tokenizer.chat_template
