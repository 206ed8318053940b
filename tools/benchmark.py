"""Throughput benchmarks of the ldm platform, one subcommand each (a module of tools/bench/ each).

    python tools/benchmark.py data --shards 'data/train/shard-{000000..000009}.tar' --workers 0 1 2 4
    python tools/benchmark.py train --config experiments/shapes/txt2img_unet.yaml --device cuda --precision bf16-mixed
    python tools/benchmark.py sample --config experiments/shapes/txt2img_unet.yaml \
        --model.backbone configs/backbone/dit-tiny.yaml
    python tools/benchmark.py train --config experiments/cifar10/unet.yaml --loader 1            # data included
    python tools/benchmark.py train --config experiments/cifar10/unet.yaml --cached 'data/cifar10-latents/train/*.tar'
    python tools/benchmark.py compare --arch unet --fast      # vs diffusers' UNet2DConditionModel, same weights

`data` times the train loader per DataLoader worker count and image decoding; `train` and `sample` time an
experiment's optimisation steps and its `evaluation_images` (any option the tool does not know, such as
`--model.backbone ...`, goes to the `ldm` CLI after the `--config` files); `compare` times our training step
against diffusers' with the same weights. Each prints a table and a final JSON line; `<command> --help` says more.
"""

from bench.cli import main  # tools/ is on sys.path when this file runs as a script

if __name__ == "__main__":
    main()
