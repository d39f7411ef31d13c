# Fine-tune OpenAI's GPT-2 on Tiny Shakespeare in GPT-2 BPE tokens, as nanoGPT's finetune_shakespeare does.
# Needs transformers (pip install -e '.[hf]') and, once, the weights from the Hugging Face hub; a saved copy
# loads offline with --init_from=hf:<folder>. gpt2-xl wants a GPU; on a CPU try --init_from=gpt2.
# $ python train_efficient.py config/finetune_shakespeare.py
# $ python sample.py --out_dir=out-shakespeare-gpt2 --start="ROMEO:"

out_dir = 'out-shakespeare-gpt2'
eval_interval = 5
eval_iters = 40
final_eval_windows = 100  # the first 100 validation windows of 1,024 tokens
log_interval = 1

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2: 1.5B parameters

# only save checkpoints if the validation loss improves, in nanoGPT; here every evaluation writes one
# the number of examples per iter: 1 batch_size * 32 grad accum * 1024 tokens = 32,768 tokens/iter;
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at a constant learning rate
learning_rate = 3e-5
decay_lr = False
