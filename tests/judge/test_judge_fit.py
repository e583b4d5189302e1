"""Judges that fit the judge model (issue 20): a chat model's prompt keeps its turn markers, the chat preset asks
for the answer after the assistant header, answer tokens are checked against the judge's vocabulary before any
request, and a reward judge refuses a model without a trained reward head."""
import string

import pytest

from megatron_inpo.config import ConfigError
from megatron_inpo.judge import Comparison, JudgeConfig, make_judge
from megatron_inpo.judge.pairwise import PairwiseJudge
from tests.helpers.rollout import CHARS, make_tiny_llama, make_tokenizer, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

# ChatML as SmolLM2-Instruct writes it: its BOS token is the turn marker <|im_start|>
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-3 style: BOS once at the start of the text, other tokens mark the turns
BOS_ONCE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def chatml_tokenizer(path=None):
    """A character-level tokenizer with ChatML's special tokens, BOS = <|im_start|>, EOS = <|im_end|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = CHATML
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


class Recorder:
    """A judge backend that answers P(first) = 0.7 and keeps every input it was asked about."""

    def __init__(self, vocab_size=None):
        self.inputs, self.vocab_size = [], vocab_size

    def token_logprobs(self, inputs, token_ids):
        import math

        self.inputs += inputs
        return [[math.log(0.7), math.log(0.3)] for _ in inputs]


@pytest.fixture(scope="module")
def chat_judge_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("chat_judge")
    tok = chatml_tokenizer(d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=2)).save_pretrained(str(d))
    return d


def test_chatml_judge_input_keeps_every_turn_marker():
    tok = chatml_tokenizer()
    j = PairwiseJudge(Recorder(), tok, JudgeConfig(kind="pairwise"))  # the RLHFlow preset, strip_bos on
    text = tok.decode(j.render("Q?", "x", "y"))
    whole = tok.apply_chat_template([{"role": "user", "content": "[CONTEXT] "}], tokenize=False)
    assert whole.count("<|im_start|>") == 1 and text.startswith("<|im_start|>user\n[CONTEXT] ")
    assert text.count("<|im_start|>") == 1 and text.count("<|im_end|>") == 1 and text.endswith("<|im_end|>\n")
    # the chat preset: the plain prompt as context, the assistant header last, every marker kept
    c = PairwiseJudge(Recorder(), tok, JudgeConfig(kind="pairwise", preset="chat"))
    text = tok.decode(c.render("Q?", "x", "y"))
    assert text.startswith("<|im_start|>user\nWhich response answers the request better?")
    assert "[REQUEST]\nQ?\n" in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 2


def test_a_leading_bos_is_stripped_but_not_one_inside_the_texts(tmp_path):
    tok = make_tokenizer(tmp_path)
    tok.chat_template = BOS_ONCE
    j = PairwiseJudge(Recorder(), tok, JudgeConfig(kind="pairwise"))
    text = tok.decode(j.render("say <s>", "a <s> b", "y"))
    assert text.startswith("[user] [CONTEXT] ")  # the template's BOS removed, as RLHFlow's reference does
    assert text.count("<s>") == 2  # the prompt's and the response's own text untouched


def test_chat_preset_judges_with_a_chat_model(chat_judge_dir):
    j = make_judge(JudgeConfig(kind="pairwise", preset="chat", model_path=str(chat_judge_dir)))
    assert j.tokenizer.bos_token == "<|im_start|>"
    probs = j.compare([Comparison("Say hi", "hi", "no"), Comparison("Name a colour", "blue", "blue")])
    assert 0 < probs[0] < 1 and probs[1] == pytest.approx(0.5, abs=1e-6)
    assert j.tokenizer.decode(j.render("Q?", "x", "y")).endswith("<|im_start|>assistant\n")


def test_presets_and_fields():
    from megatron_inpo.judge.base import PAIRWISE_PRESETS

    assert set(PAIRWISE_PRESETS) == {"rlhflow_pm", "chat"}
    r = JudgeConfig().rendering()
    assert (r.context_format, r.add_generation_prompt, r.strip_bos, r.token_a) == ("rlhflow", False, True, "A")
    r = JudgeConfig(preset="chat", add_generation_prompt=False, token_a="Y", token_b="N").rendering()
    assert (r.context_format, r.add_generation_prompt, r.token_a, r.token_b) == ("plain", False, "Y", "N")
    with pytest.raises(ConfigError, match="judge.preset"):
        JudgeConfig(kind="pairwise", model_path="x", preset="gpt").validate()


@pytest.mark.parametrize("token, field", [("é", "judge.token_a"), ("Ω", "judge.token_a")])
def test_answer_tokens_outside_the_vocabulary_are_refused_before_any_request(tmp_path, token, field):
    tok = make_tokenizer(tmp_path)
    rec = Recorder()
    with pytest.raises(ConfigError, match=f"^{field}: .*not in the judge's vocabulary"):
        PairwiseJudge(rec, tok, JudgeConfig(kind="pairwise", token_a=token))
    assert rec.inputs == []


def test_answer_token_beyond_the_models_vocabulary_is_refused(tmp_path):
    make_tiny_llama(tmp_path, vocab=60)  # the tokenizer knows more characters than the model has rows
    tilde = 3 + CHARS.index("~")
    assert tilde >= 60
    with pytest.raises(ConfigError, match=r"^judge.token_b: '~' is token \d+ .*outside the judge model's "
                                          r"vocabulary of 60"):
        make_judge(JudgeConfig(kind="pairwise", model_path=str(tmp_path), token_b="~"))
    assert make_judge(JudgeConfig(kind="pairwise", model_path=str(tmp_path))).id_b < 60


def test_same_answer_token_twice_is_refused():
    with pytest.raises(ConfigError, match="judge.token_a/token_b: must differ"):
        JudgeConfig(kind="pairwise", model_path="x", preset="chat", token_b="A").validate()


def test_reward_judge_refuses_a_model_without_a_reward_head(tmp_path):
    make_tiny_llama(tmp_path, kind="causal", seed=1)
    with pytest.raises(ConfigError, match=r"^judge.model_path .*: no trained reward head: score.weight missing"):
        make_judge(JudgeConfig(kind="reward", model_path=str(tmp_path)))


def test_reward_judge_accepts_a_reward_model(tmp_path):
    make_tiny_llama(tmp_path, kind="reward", seed=1)
    j = make_judge(JudgeConfig(kind="reward", model_path=str(tmp_path)))
    assert len(j.score([("q", "a")])) == 1


def test_ascii_letters_are_single_tokens():  # the default answers of both presets in the test vocabulary
    assert "A" in string.ascii_letters and "A" in CHARS
