"""FVD: the Fréchet distance between the generated and the reference clips' I3D features (Unterthiner et al. 2018).

The network is the one the field reports with: the TorchScript port of the Kinetics-400 I3D of Google's TF-Hub
FVD (StyleGAN-V's ``i3d_torchscript.pt``, also read by Latte's and common_metrics_on_video_quality's FVD; its
authors measured the port against TF-Hub's model to 3e-4 L2 on random clips and the FVD to 1e-6). Its forward
takes (B, 3, T, H, W) clips and the options ``rescale`` (from [0, 255] pixels to [-1, 1]), ``resize`` (each frame to
224 x 224) and ``return_features`` (the 400 logits before the softmax: the FVD features). Here clips in [-1, 1]
are quantised to 8 bits as decoded files are and given in [-1, 1] (``rescale=False``, ``resize=True``), as
TF-Hub's FVD gives its frames (``2 x / 255 - 1`` after a bilinear resize to 224).

The distance is FID's (``ldm.metrics.fid.frechet_distance``) over the features streamed into a ``FeatureSet``,
so it adds up across batches and ranks like FID; its covariances are unbiased (N - 1), StyleGAN-V's are not
(N): the two differ by O(1 / N). Published FVDs are of 16-frame clips at 2,048 samples or more ("FVD16");
a figure of other clips compares only with itself.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.metrics.fid import FID
from ldm.nn.frozen import StaysInEval
from ldm.weights.io import WeightsError, error_line
from ldm.weights.pretrained import hub_weights

I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"  # StyleGAN-V's detector_url
I3D_FILE = "i3d_torchscript.pt"  # its name in torch hub's checkpoints folder (ldm.weights.pretrained.hub_checkpoint)
I3D_OPTION = "i3d_weights of SampleMetrics or --i3d-weights of tools/evaluate.py"
I3D_ARGUMENTS = ("rescale", "resize", "return_features")  # the keyword options its forward must take
I3D_MIN_FRAMES = 9  # T that survives its three temporal stride-2 stages (SAME padding) and the final 2-frame pool


def load_detector(weights: str | os.PathLike[str] | None = None) -> torch.jit.ScriptModule:
    """The I3D TorchScript archive, in eval mode on the CPU: ``weights``, else torch hub's cache, else downloaded there.

    TorchScript runs only TorchScript operators (no pickled Python), which is why the field ships I3D this way;
    a file that is not such an archive, or whose forward lacks I3D's options, is refused naming the file.
    """
    path = hub_weights(weights, I3D_URL, what="FVD I3D weights", option=I3D_OPTION, check_hash=False)
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript, the only form of the field's I3D
            warnings.filterwarnings("ignore", r".*torch\.jit\.load.* is deprecated", FutureWarning)
            detector = torch.jit.load(path, map_location="cpu")
    except Exception as error:  # a state dict, a truncated download, an HTML error page saved as .pt, ...
        raise WeightsError(f"{path}: not a TorchScript archive such as {I3D_FILE} "
                           f"({error_line(error)}); set {I3D_OPTION} to that file") from error
    taken = [argument.name for argument in detector.forward.schema.arguments]
    if not set(I3D_ARGUMENTS) <= set(taken):
        raise WeightsError(f"{path}: its forward takes {taken[1:]}, not I3D's clips and {list(I3D_ARGUMENTS)}; "
                           f"set {I3D_OPTION} to the FVD I3D file {I3D_URL}")
    return detector.eval()


class I3DFeatures(StaysInEval):
    """The feature extractor of FVD: (B, 3, T, H, W) clips in [-1, 1] -> {``FVD.feature``: (B, D)} (D = 400 for I3D).

    ``weights`` is a local copy of ``i3d_torchscript.pt`` (see ``load_detector``), or any TorchScript module with
    I3D's forward (a tiny random one in tests). Clips shorter than ``I3D_MIN_FRAMES`` would leave I3D no frames to
    pool: they are padded by repeating their first and last frames (as DFoT does), real and generated alike.
    """

    frozen_part = "net"  # stays in eval mode (StaysInEval)
    reads_clips = True  # given clips whole, not their frames (ldm.metrics.features.FeatureExtractors)

    def __init__(self, weights: str | None = None) -> None:  # None: torch hub's cache, else the download
        super().__init__()
        self.net = load_detector(weights)

    @torch.no_grad()
    def forward(self, clips: Tensor) -> dict[str, Tensor]:
        if clips.ndim != 5:
            raise ValueError(f"I3D features are of (B, 3, T, H, W) clips, got shape {tuple(clips.shape)}")
        x = clips.float().add(1).mul(127.5).round().clamp(0, 255).div(127.5).sub(1)  # (B, 3, T, H, W), 8-bit levels
        missing = I3D_MIN_FRAMES - x.shape[2]
        if missing > 0:
            x = F.pad(x, (0, 0, 0, 0, missing // 2, missing - missing // 2), mode="replicate")  # (B, 3, 9, H, W)
        features = self.net(x, rescale=False, resize=True, return_features=True)  # (B, 400)
        return {FVD.feature: features}


class FVD(FID):
    """Fréchet Video Distance of the generated clips to the reference, from the mean and covariance of their
    ``I3DFeatures`` (the extractor for the feature kind "i3d"), one row per clip; a set of images is refused."""

    names = ("fvd",)
    label = "FVD"
    feature = "i3d"
    reads_clips = True  # features of whole clips (ldm.metrics.features.reads_clips)

