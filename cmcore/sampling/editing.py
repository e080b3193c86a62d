"""Zero-shot editing with a consistency model (paper, Section 6.3 and Algorithm 4).

Algorithm 4 takes an invertible linear map A and a mask Omega in A's basis (1 = generate,
0 = keep from the reference y):
    y <- A^{-1}[(A y) (1 - Omega)]
    x ~ N(y, tau_1^2 I);  x <- f(x, tau_1);  x <- A^{-1}[(A y) (1 - Omega) + (A x) Omega]
    for n = 2..N:  x ~ N(x, (tau_n^2 - eps^2) I);  x <- f(x, tau_n);  the same replacement.
Every A here is orthogonal, so A^{-1} = A^T, its pseudo-inverse; the kept coordinates of the
result are those of y (exactly for inpainting, to rounding for the rotations).

API (times tau_1 > tau_2 > ...; images NCHW in [-1, 1]; ``clip`` clamps each f output to
[-1, 1] as the official code does; random numbers from torch's global generator):
    edit(f, y, A, Omega, taus, eps=0.002, clip=False)      the shared core, Algorithm 4
    inpaint(f, y, known, taus)              A = I, Omega = 1 - known (known: 1 = keep the pixel)
    colorize(f, grey, taus)                 A = rotation of RGB whose first axis is luma (601)
    super_resolve(f, y_low, factor, taus)   A = rotation of each factor x factor block whose first
                                            axis is the block mean
    sdedit(f, strokes, taus)                SDEdit: strokes noised to tau_1, then Algorithm 1
    interpolate(f, z0, z1, alphas, taus=()) slerp of the initial noise z, then Algorithm 1
    denoise(f, x_sigma, sigma, taus=())     f(x_sigma, sigma): the noisy image is a point at sigma
    Identity, ChannelRotation(Q), BlockRotation(Q, p)       the linear maps A (A(x), A.inverse(x))
"""

import torch

from cmcore.diffusion.rng import same_randomness
from cmcore.sampling.samplers import consistency_sample

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights; they sum to one


class Identity:
    """A x = x (inpainting)."""

    def __call__(self, x):
        return x

    def inverse(self, a):
        return a


class ChannelRotation:
    """(A x)_d = sum_c Q[d, c] x_c at every pixel, Q orthogonal (C, C)."""

    def __init__(self, Q):
        self.Q = Q

    def __call__(self, x):
        return torch.einsum("dc,bchw->bdhw", self.Q.to(x), x)

    def inverse(self, a):
        return torch.einsum("dc,bdhw->bchw", self.Q.to(a), a)


class BlockRotation:
    """A x = Q applied to every p x p block of every channel, flattened row-major.

    Coefficients have shape (B, C, H/p, W/p, p^2); Q is orthogonal (p^2, p^2).
    """

    def __init__(self, Q, p):
        self.Q, self.p = Q, p

    def __call__(self, x):
        B, C, H, W = x.shape
        p = self.p
        blocks = x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
        return blocks.reshape(B, C, H // p, W // p, p * p) @ self.Q.to(x).T

    def inverse(self, a):
        B, C, h, w, _ = a.shape
        p = self.p
        blocks = (a @ self.Q.to(a)).reshape(B, C, h, w, p, p).permute(0, 1, 2, 4, 3, 5)
        return blocks.reshape(B, C, h * p, w * p)


def rotation_with_first_row(v):
    """Orthogonal Q (n, n) with Q[0] = v / ||v||: QR (Gram-Schmidt) of [v, e_2, ..., e_n].

    Needs v[0] != 0 so that the columns are independent. Float64.
    """
    v = torch.as_tensor(v, dtype=torch.float64)
    if v[0] == 0:
        raise ValueError("rotation_with_first_row needs v[0] != 0")
    M = torch.eye(len(v), dtype=torch.float64)
    M[:, 0] = v / v.norm()
    Q = torch.linalg.qr(M).Q
    Q[:, 0] *= torch.sign(Q[:, 0] @ v)  # QR fixes columns up to sign; make column 0 = +v/|v|
    return Q.T.contiguous()


def _refine(f, x, taus, sigmas, clip, replace):
    """x <- replace(f(x + s_n z, tau_n)) for (tau_n, s_n) in zip(taus, sigmas)."""
    for tau, s in zip(taus, sigmas, strict=True):
        # Noise to tau_n, then map back to the trajectory's origin.
        x = f(x + s * torch.randn_like(x), tau)
        x = x.clamp(-1, 1) if clip else x
        x = replace(x)
    return x


def _from_reference(taus, eps):
    """Noise levels when starting from a clean reference: tau_1, then sqrt(tau_n^2 - eps^2)."""
    if len(taus) == 0:
        raise ValueError("editing needs at least one time tau_1")
    return [taus[0]] + [(tau**2 - eps**2) ** 0.5 for tau in taus[1:]]


@torch.no_grad()
def edit(f, y, A, Omega, taus, eps=0.002, clip=False):
    """Algorithm 4: multistep consistency sampling that keeps the coordinates (A y)(1 - Omega).

    ``A`` maps images to coefficients (``A(x)``, ``A.inverse(a)``), orthogonal; ``Omega``
    broadcasts to A's coefficients, 1 where the model generates and 0 where y is kept.
    """
    Ay_kept = A(y) * (1 - Omega)

    def replace(x):
        return A.inverse(Ay_kept + A(x) * Omega)

    # Line 2: the reference with its unknown coordinates set to zero.
    y = A.inverse(Ay_kept)
    return _refine(f, y, taus, _from_reference(taus, eps), clip, replace)


def inpaint(f, y, known, taus, eps=0.002, clip=True):
    """Inpainting: A = I, Omega = 1 - known; the pixels where known = 1 are y's exactly."""
    known = torch.as_tensor(known, dtype=y.dtype, device=y.device)
    return edit(f, y, Identity(), 1 - known, taus, eps, clip)


def luma(x):
    """Y = 0.299 R + 0.587 G + 0.114 B per pixel: (B, 3, H, W) -> (B, 1, H, W)."""
    return torch.einsum("c,bchw->bhw", torch.tensor(LUMA).to(x), x)[:, None]


def colorize(f, grey, taus, eps=0.002, clip=True):
    """Colourisation: grey (B, 1, H, W) -> (B, 3, H, W) whose luma is the grey image's.

    A rotates RGB so that its first axis is the luma direction; only that axis is kept.
    """
    y = grey.expand(-1, 3, -1, -1)
    A = ChannelRotation(rotation_with_first_row(LUMA))
    Omega = torch.tensor([0.0, 1.0, 1.0], dtype=grey.dtype, device=grey.device)[:, None, None]
    return edit(f, y, A, Omega, taus, eps, clip)


def super_resolve(f, y_low, factor, taus, eps=0.002, clip=True):
    """Super-resolution: y_low (B, C, H, W) -> (B, C, factor H, factor W) whose factor x factor
    block means are y_low's (A's first axis per block is the mean; the others are generated).
    """
    y = y_low.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    A = BlockRotation(rotation_with_first_row(torch.ones(factor * factor)), factor)
    Omega = torch.ones(factor * factor, dtype=y.dtype, device=y.device)
    Omega[0] = 0
    return edit(f, y, A, Omega, taus, eps, clip)


@torch.no_grad()
def sdedit(f, strokes, taus, eps=0.002, clip=True):
    """SDEdit (stroke-guided generation): x ~ N(strokes, tau_1^2 I), x <- f(x, tau_1), then
    Algorithm 1's steps over tau_2.. with no constraint. tau_1 < T trades realism for
    faithfulness to the strokes.
    """
    return _refine(f, strokes, taus, _from_reference(taus, eps), clip, replace=lambda x: x)


def slerp(z0, z1, alpha):
    """z_alpha = sin((1 - alpha) psi) / sin(psi) z0 + sin(alpha psi) / sin(psi) z1 per sample,
    psi = arccos(<z0, z1> / (|z0| |z1|)); linear where psi is 0. Exact at alpha = 0 and 1.
    """
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    psi = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(psi)
    degenerate = sin < 1e-12
    safe = torch.where(degenerate, torch.ones_like(sin), sin)
    w0 = torch.where(degenerate, 1 - alpha, torch.sin((1 - alpha) * psi) / safe)
    w1 = torch.where(degenerate, alpha, torch.sin(alpha * psi) / safe)
    shape = (-1,) + (1,) * (z0.ndim - 1)
    return w0.reshape(shape) * z0 + w1.reshape(shape) * z1


@torch.no_grad()
def interpolate(f, z0, z1, alphas, taus=(), eps=0.002, T=80.0):
    """x_alpha = Algorithm 1 from z_alpha = slerp(z0, z1, alpha) (z ~ N(0, I), x_T = T z).

    Returns (len(alphas), B, ...). Every alpha starts from the same RNG state, so the
    re-noising of multistep sampling is shared and alpha = 0 / 1 reproduce
    consistency_sample(f, z0 / z1, taus) run from that state.
    """
    fns = [lambda a=a: consistency_sample(f, slerp(z0, z1, a), taus, eps, T) for a in alphas]
    return torch.stack(same_randomness(z0.device, *fns))


@torch.no_grad()
def denoise(f, x_sigma, sigma, taus=(), eps=0.002, clip=False):
    """x = f(x_sigma, sigma): an image with N(0, sigma^2 I) noise is a point of the trajectory at
    time sigma; optional further times tau < sigma refine it as in Algorithm 1.
    """
    x = f(x_sigma, sigma)
    x = x.clamp(-1, 1) if clip else x
    sigmas = [(tau**2 - eps**2) ** 0.5 for tau in taus]
    return _refine(f, x, taus, sigmas, clip, replace=lambda x: x)
