"""A faithful stand-in for the parts of kohya-ss/sd-scripts library/train_util.py the optimizer meets
(contract §1-§2): get_optimizer's name resolution and argument parsing, read_config_from_file."""

import argparse
import ast
import importlib

import toml
import torch


def add_optimizer_arguments(parser):
    parser.add_argument("--optimizer_type", type=str, default="")
    parser.add_argument("--optimizer_args", type=str, default=None, nargs="*")
    parser.add_argument("--learning_rate", type=float, default=2e-6)
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--use_lion_optimizer", action="store_true")


def verify_command_line_training_args(args):
    return None


def read_config_from_file(args, parser):
    """kohya: toml.load, every table flattened, then argv re-parsed into the namespace (CLI > TOML > defaults)."""
    if not args.config_file:
        return args
    flat = {}
    for section in toml.load(args.config_file).values():
        if isinstance(section, dict):
            flat.update(section)
    config_args = argparse.Namespace(**flat)
    args = parser.parse_args(namespace=config_args)
    args.config_file = None
    return args


def get_optimizer(args, trainable_params):
    """kohya's rules: lower-cased built-in names, the '8bit' / 'schedulefree' suffix branches, then the
    case-sensitive dotted-path fallback; optimizer_args split on '=' and read with ast.literal_eval."""
    optimizer_type = args.optimizer_type
    if args.use_8bit_adam:
        optimizer_type = "AdamW8bit"
    elif args.use_lion_optimizer:
        optimizer_type = "Lion"
    if optimizer_type is None or optimizer_type == "":
        optimizer_type = "AdamW"
    optimizer_type_lower = optimizer_type.lower()

    optimizer_kwargs = {}
    if args.optimizer_args is not None and len(args.optimizer_args) > 0:
        for arg in args.optimizer_args:
            key, value = arg.split("=")  # kohya: no maxsplit
            value = ast.literal_eval(value)
            optimizer_kwargs[key] = value

    lr = args.learning_rate
    optimizer = None
    if optimizer_type_lower == "adamw":
        optimizer_class = torch.optim.AdamW
        optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)
    elif optimizer_type_lower.endswith("8bit"):
        import bitsandbytes as bnb  # noqa: F401  (kohya imports bitsandbytes first)

        if optimizer_type_lower == "adamw8bit":
            optimizer_class = bnb.optim.AdamW8bit
            optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)
    elif optimizer_type_lower.endswith("schedulefree"):
        import schedulefree  # noqa: F401  (kohya imports schedulefree first)

    if optimizer is None:
        case_sensitive = optimizer_type
        if "." not in case_sensitive:
            optimizer_class = getattr(torch.optim, case_sensitive)
        else:
            values = case_sensitive.split(".")
            optimizer_module = importlib.import_module(".".join(values[:-1]))
            case_sensitive = values[-1]
            optimizer_class = getattr(optimizer_module, case_sensitive)
        optimizer = optimizer_class(trainable_params, lr=args.learning_rate, **optimizer_kwargs)

    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()
    optimizer_name = optimizer_class.__module__ + "." + optimizer_class.__name__
    optimizer_args = ",".join([f"{k}={v}" for k, v in optimizer_kwargs.items()])
    return optimizer_name, optimizer_args, optimizer
