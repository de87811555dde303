"""How distinct the initial virtual tokens are: mean pairwise cosine similarity of a prefix's initial keys/values
for every initialisation option, flat and reparameterised, on a real encoder and real training data.

    python bench/prefix_init_cosine.py [--encoder offline:minilm] [--task tasks/conll2003.yaml] [--length 16]

Each virtual token is the vector of all its layers' keys and values; 0 means unrelated directions, 1 one token
repeated. "before" is the initialisation the toolkit shipped first (N(0, 0.02) embedding through an MLP with
PyTorch's default output bias), rebuilt here for comparison.
"""

from __future__ import annotations


import torch

import common
from multitask.backbone import encoder_shape, load_encoder
from multitask.prefix.bank import PrefixBank, TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.prefix.encoder import PrefixEncoder
from multitask.prefix.initialization import initialize_prefixes, mean_pairwise_cosine
from multitask.runtime import load_tokenizer
from multitask.tasks.loading import load_task

TARGET = 0.2  # mean pairwise cosine of random initialisations (issue: distinct initial virtual tokens)


def first_release_cosine(length: int, shape, mlp_hidden: int) -> float:
    """The first release's reparameterised start: N(0, 0.02) embedding, default Linear init (with bias)."""
    prefix = PrefixEncoder(PrefixConfig(length=length, reparameterize=True, mlp_hidden_size=mlp_hidden, dropout=0.0),
                           shape.num_layers, shape.num_heads, shape.head_dim)
    with torch.no_grad():
        torch.nn.init.normal_(prefix.embedding, std=0.02)
        for layer in (prefix.mlp[0], prefix.mlp[2]):
            layer.reset_parameters()
    return mean_pairwise_cosine(prefix().detach())


def main() -> None:
    parser = common.parser_for(__doc__)
    parser.add_argument("--task", default=str(common.REPO / "tasks" / "conll2003.yaml"))
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--mlp-hidden", type=int, default=512)
    parser.add_argument("--limit", type=int, default=5000, help="training examples whose tokens are counted")
    args = parser.parse_args()
    if args.quick:
        args.limit = 200
    device = common.setup(args)
    encoder = load_encoder(args.encoder).to(device).eval()
    tokenizer = load_tokenizer(args.encoder)
    task = load_task(args.task)
    features = common.task_features(task, args.task, "train", args.limit, tokenizer, training=True)
    sequences = {task.config.name: [f.input_ids for f in features]}
    shape = encoder_shape(encoder.config)
    rows = [["first release (MLP, N(0, 0.02), output bias)", f"{first_release_cosine(args.length, shape, args.mlp_hidden):.3f}"]]
    for init in ("normal", "uniform", "vocab"):
        for reparameterize in (False, True):
            config = PrefixConfig(length=args.length, reparameterize=reparameterize, mlp_hidden_size=args.mlp_hidden,
                                  dropout=0.0, init=init)
            layout = plan_layout(PrefixBankConfig(prefix=config), [TaskPrefixRequest(task.config.name)])
            bank = PrefixBank(layout, shape.num_layers, shape.num_heads, shape.head_dim).to(device)
            similarity = initialize_prefixes(bank, encoder, tokenizer, sequences)
            rows.append([f"{init}, {'MLP' if reparameterize else 'flat'}", f"{next(iter(similarity.values())):.3f}"])
    common.print_header("initial virtual tokens: mean pairwise cosine similarity", args, device,
                        task=task.config.name, length=args.length, mlp=args.mlp_hidden, examples=len(features))
    common.print_table(["initialisation", "mean pairwise cosine"], rows)
    print(f"random initialisations (normal, uniform) should be < {TARGET}; vocab keeps real words' own similarity")
    common.print_footer()


if __name__ == "__main__":
    main()
