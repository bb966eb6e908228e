"""Networks by name: one small registry for segmentation and one for classification.

Every entry builds an untrained network from (in_channels, out_channels). Nothing is downloaded: the
segmentation-models-pytorch and timm entries use random encoder weights, as these machines reach no hub.
`multiple` is what the input side must divide by (one halving per downsampling level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    build: Callable[[int, int], nn.Module]
    multiple: int
    description: str
    gradcam_layer: str = ""  # the layer MONAI's GradCAM reads (classification only)


def _monai_unet(in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def _monai_attention_unet(in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                         channels=(16, 32, 64, 128), strides=(2, 2, 2))


def _monai_segresnet(in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, init_filters=16,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def _smp_unet(in_channels: int, out_channels: int) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=in_channels, classes=out_channels)


def _monai_densenet121(in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=out_channels)


def _timm_resnet18(in_channels: int, out_channels: int) -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, in_chans=in_channels, num_classes=out_channels)


SEGMENTATION_NETWORKS: dict[str, NetworkSpec] = {
    "unet": NetworkSpec(_monai_unet, 16, "MONAI UNet, channels 16-256, 2 residual units"),
    "attention_unet": NetworkSpec(_monai_attention_unet, 8, "MONAI AttentionUnet, channels 16-128"),
    "segresnet": NetworkSpec(_monai_segresnet, 8, "MONAI SegResNet, 16 initial filters"),
    "smp_unet": NetworkSpec(_smp_unet, 32, "segmentation-models-pytorch Unet, resnet18 encoder, random weights"),
}

CLASSIFICATION_NETWORKS: dict[str, NetworkSpec] = {
    "densenet121": NetworkSpec(_monai_densenet121, 32, "MONAI DenseNet121", gradcam_layer="class_layers.relu"),
    "resnet18": NetworkSpec(_timm_resnet18, 32, "timm resnet18, random weights", gradcam_layer="layer4"),
}

DEFAULT_NETWORK = {"seg": "unet", "cls": "densenet121"}


def network_spec(task: str, name: str) -> NetworkSpec:
    """The registry entry for `name`, raising a message that names --network and the choices."""
    registry = SEGMENTATION_NETWORKS if task == "seg" else CLASSIFICATION_NETWORKS
    if name not in registry:
        raise ValueError(f"--network: unknown {task} network '{name}'; expected one of {', '.join(registry)}")
    return registry[name]


def check_resolution(task: str, name: str, resolution: int) -> None:
    """Refuse a resolution the network's downsampling cannot divide evenly."""
    multiple = network_spec(task, name).multiple
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"--resolution: network '{name}' needs a multiple of {multiple} px, got {resolution}")


def build_network(task: str, name: str, in_channels: int, out_channels: int) -> nn.Module:
    return network_spec(task, name).build(in_channels, out_channels)
