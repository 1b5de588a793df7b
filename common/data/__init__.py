"""Data for the LM experiments: corpora, synthetic source, grain pipelines.

  corpus = load_token_corpus("stdlib", tokenizer="byte")            # TokenCorpus
  train = make_lm_dataset(corpus.train, seq_len=128, batch_size=16, seed=0, accum_steps=2)
  it = iter(train); batch = next(it)                                 # inputs/targets [A, B, T]
  state = iterator_state(it)                                         # {"next_index": n}
"""

from common.data.corpus import TextCorpus, open_corpus, split_of, stdlib_corpus
from common.data.pipeline import (iterator_state, iterator_state_to_bytes, make_eval_dataset,
                                  make_lm_dataset, num_windows, restore_iterator_state)
from common.data.synthetic import (MarkovChain, conditional_entropies, dependency_range,
                                   make_markov_chain, sample_markov_tokens)
from common.data.tokens import TokenCorpus, load_token_corpus, tokenize_documents
