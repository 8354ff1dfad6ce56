"""Like kohya's sdxl_train_network.py: a NetworkTrainer subclass in its own script."""

import train_network
from library import train_util


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def build_models(self):
        unet, text_encoder = super().build_models()
        return unet, text_encoder


def setup_parser():
    return train_network.setup_parser()


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = SdxlNetworkTrainer()
    trainer.train(args)
