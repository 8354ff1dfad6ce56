"""A stand-in for kohya's train_network.py: NetworkTrainer.train has kohya's locals (self, network, args,
lr_descriptions, accelerator) when it calls get_optimizer, and logs exactly as kohya does (only with a
tracker; generate_step_logs, then tracker.log for every accelerate tracker)."""

import argparse

import torch
from accelerate import Accelerator
from torch import nn

from library import train_util
from networks.lora import LoRANetwork


class NetworkTrainer:
    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer=None,
                           keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None, mean_combined_norm=None):
        logs = {"loss/current": current_loss, "loss/average": avr_loss}
        for i, lr in enumerate(lr_scheduler.get_last_lr()):
            logs[f"lr/{lr_descriptions[i]}"] = lr
        return logs

    def step_logging(self, accelerator, logs, global_step, epoch):
        for tracker in accelerator.trackers:  # kohya: tracker.log directly, not accelerator.log
            tracker.log(logs, step=global_step)

    def build_models(self):
        torch.manual_seed(0)
        unet = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        text_encoder = nn.Sequential(nn.Linear(8, 8))
        for module in (unet, text_encoder):
            module.requires_grad_(False)
        return unet, text_encoder

    def train(self, args):
        accelerator = Accelerator(log_with="tensorboard" if args.logging_dir else None, project_dir=args.logging_dir)
        if args.logging_dir:
            accelerator.init_trackers("network_train")
        unet, text_encoder = self.build_models()
        network = LoRANetwork(unet, text_encoder, loraplus_lr_ratio=args.loraplus_lr_ratio)
        network.apply_to(text_encoder, unet)
        trainable_params, lr_descriptions = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
        is_tracking = len(accelerator.trackers) > 0
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(16, 8, generator=gen)
        target = torch.randn(16, 8, generator=gen) * 0.1
        self.losses, self.logged = [], []
        for step in range(args.max_train_steps):
            h = text_encoder(x)
            loss = nn.functional.mse_loss(unet(h), target)
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            current_loss = loss.detach().item()
            self.losses.append(current_loss)
            if is_tracking:
                logs = self.generate_step_logs(args, current_loss, current_loss, lr_scheduler, lr_descriptions, optimizer)
                self.logged.append(logs)
                self.step_logging(accelerator, logs, step, 0)
        accelerator.end_training()
        self.optimizer_name, self.optimizer = optimizer_name, optimizer
        return self


def setup_parser():
    parser = argparse.ArgumentParser()
    train_util.add_optimizer_arguments(parser)
    parser.add_argument("--config_file", type=str, default=None)
    parser.add_argument("--logging_dir", type=str, default=None)
    parser.add_argument("--max_train_steps", type=int, default=5)
    parser.add_argument("--unet_lr", type=float, default=None)
    parser.add_argument("--text_encoder_lr", type=float, default=None)
    parser.add_argument("--loraplus_lr_ratio", type=float, default=None)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = NetworkTrainer()
    trainer.train(args)
