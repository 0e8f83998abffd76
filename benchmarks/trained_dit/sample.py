"""Sample the shapes DiT in torch (the FP32 reference): the 8 fixed captions of captions.npz, 20 DPM-Solver++ steps,
guidance 4.5, channels 0-2 of the 16 x 16 latent shown as RGB (8x upscaled), side by side.

    python benchmarks/trained_dit/sample.py MODEL_DIR OUT.png
"""

import sys

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from PIL import Image

folder, out = sys.argv[1], sys.argv[2]
model = PixArtTransformer2DModel.from_pretrained(f"{folder}/transformer").eval()
scheduler = DPMSolverMultistepScheduler.from_pretrained(f"{folder}/scheduler")
data = np.load(f"{folder}/captions.npz")
caps, mask = torch.from_numpy(data["captions"]), torch.from_numpy(data["mask"])
n = caps.shape[0]
x = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
scheduler.set_timesteps(20)
uncond, umask = torch.zeros_like(caps), torch.zeros_like(mask)
umask[:, 0] = 1
with torch.no_grad():
    for t in scheduler.timesteps:
        out_both = model(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond, caps]),
                         encoder_attention_mask=torch.cat([umask, mask]), timestep=torch.full((2 * n,), int(t)),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
        u, c = out_both.chunk(2)
        x = scheduler.step(u + 4.5 * (c - u), t, x).prev_sample
img = ((x[:, :3].clamp(-1, 1) + 1) * 127.5).byte().permute(0, 2, 3, 1).numpy()
Image.fromarray(np.concatenate([np.kron(im, np.ones((8, 8, 1), np.uint8)) for im in img], axis=1)).save(out)
print(", ".join(str(t) for t in data["text"]))
