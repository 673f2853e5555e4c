"""Configuration of a megaloop looped language model for Hugging Face transformers."""
from transformers import PreTrainedConfig


class MegaloopConfig(PreTrainedConfig):
    """The model fields of megaloop's config. `num_recur` (the recurrences run) can be set at load
    time: from_pretrained(DIR, trust_remote_code=True, num_recur=8)."""

    model_type = "megaloop"

    def __init__(self, d_model=256, n_head=2, n_kv_head=None, head_dim=None, vocab_size=4096, seq_len=256,
                 n_prelude=2, n_recur_block=2, n_coda=2, num_recur=4, input_injection="linear", num_lanes=2,
                 trained_num_recur=None, logit_softcap=15.0, mlp_ratio=4, norm_eps=1e-6, rope_base=10000.0,
                 **kwargs):
        self.d_model, self.n_head, self.n_kv_head, self.head_dim = d_model, n_head, n_kv_head or n_head, head_dim
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.n_prelude, self.n_recur_block, self.n_coda = n_prelude, n_recur_block, n_coda
        self.num_recur, self.input_injection, self.num_lanes = num_recur, input_injection, num_lanes
        # hyperconnect keeps per-recurrence parameters for the trained r (reused cyclically past it)
        self.trained_num_recur = trained_num_recur or num_recur
        self.logit_softcap, self.mlp_ratio, self.norm_eps, self.rope_base = logit_softcap, mlp_ratio, norm_eps, rope_base
        # names transformers' generic code looks for
        self.hidden_size, self.num_attention_heads = d_model, n_head
        self.num_hidden_layers = n_prelude + n_recur_block + n_coda
        self.max_position_embeddings = seq_len
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)

    @property
    def hdim(self):
        return self.head_dim or self.d_model // self.n_head
