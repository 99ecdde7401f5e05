"""Cameras and renderers: a mesh in the unit sphere -> uint8 views (views, size, size, 3).

Two renderers share one set of cameras (a layout: ring or sphere) and one shading formula, so their
images are interchangeable:
``moderngl`` (OpenGL through EGL: Mesa llvmpipe on CPU, the NVIDIA driver on GPU machines) and
``raycast`` (Open3D's RaycastingScene, no GL at all). A renderer is created once per worker process
and renders thousands of meshes; a GL context belongs to its thread, so workers must be *spawned*.

Shading: flat (per-face) normals turned towards the viewer (two-sided: many meshes have inconsistent
winding), a directional headlight slightly above and left of the camera, an ambient term, a neutral
grey object on a plain white background. The object's brightest value stays below 255, so any pixel
that is not pure white is object (see ``coverage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from m3d.errors import M3DError, UsageError

if TYPE_CHECKING:  # render only reads mesh.vertices / mesh.faces; keep meshio out of the import path
    from m3d.meshio import Mesh

# Framing: perspective camera whose vertical (= horizontal) field of view just holds the bounding
# sphere grown by FRAME_MARGIN, so the object never touches the image border.
FOV_Y_DEG = 35.0
FRAME_MARGIN = 1.05  # camera distance so a sphere of radius r * FRAME_MARGIN touches the frame edges
# Shading, shared by both renderers (intensities in [0, 1]).
ALBEDO = 0.82
AMBIENT = 0.22
DIFFUSE = 0.78
LIGHT_CAMERA_SPACE = (-0.35, 0.45, 1.0)  # towards the light in camera coords (x right, y up, z back)
BACKGROUND = 255
RENDERERS = ("moderngl", "raycast")  # names; the classes are registered below (RENDERER_CLASSES)
#: open3d (hundreds of MB) is the fallback renderer's only need, so it is an extra, not a dependency
RAYCAST_NEEDS = "--renderer raycast needs open3d: pip install 'm3d[raycast]' (or use --renderer moderngl)"


#: Up axes a user can name; ``auto`` decides from the object and its dataset (see m3d.orientation).
UP_AXES: dict[str, tuple[float, float, float]] = {
    "x": (1.0, 0.0, 0.0), "-x": (-1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0),
    "-y": (0.0, -1.0, 0.0), "z": (0.0, 0.0, 1.0), "-z": (0.0, 0.0, -1.0),
}
UP_CHOICES = (*UP_AXES, "auto")
DEFAULT_UP = "auto"
ALIGNS = ("none", "pca")


RING_ELEVATION = 20.0  # degrees: the reference's ring


@dataclass(frozen=True)
class ViewSettings:
    """Everything that decides what the cameras see, as one value (the fingerprint holds it whole).

    ``layout`` places the ``views`` cameras (``ring``: a horizontal ring at ``elevation`` degrees about
    the up axis, RING_ELEVATION unless given; ``sphere``: spread evenly over the whole sphere, so it has
    no elevation and refuses one: a setting that changes nothing must not split collections or
    fingerprints); ``up`` is the mesh axis turned to the
    cameras' up before rendering; ``align`` ``pca``
    poses the mesh by its principal axes instead (for arbitrarily rotated data).
    """

    views: int = 8
    elevation: float | None = None  # ring only; None: RING_ELEVATION
    size: int = 224
    renderer: str = "moderngl"
    up: str = DEFAULT_UP
    layout: str = "ring"
    align: str = "none"

    def __post_init__(self) -> None:
        if int(self.views) != self.views or self.views < 1:
            raise UsageError(f"views must be a positive integer, got {self.views!r}")
        if int(self.size) != self.size or not 8 <= self.size <= 8192:
            raise UsageError(f"image size must be an integer in [8, 8192], got {self.size!r}")
        for name, value, choices in (("renderer", self.renderer, RENDERERS), ("up", self.up, UP_CHOICES),
                                     ("layout", self.layout, LAYOUTS), ("align", self.align, ALIGNS)):
            if value not in choices:
                raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        if self.layout == "ring" and self.elevation is None:
            object.__setattr__(self, "elevation", RING_ELEVATION)  # frozen: settled once, here
        if self.layout != "ring" and self.elevation is not None:
            raise UsageError(f"--layout {self.layout} spreads its cameras over the whole sphere: "
                             f"--elevation is for the ring only")
        if self.elevation is not None and not -90.0 <= float(self.elevation) <= 90.0:
            raise UsageError(f"elevation must be within [-90, 90] degrees, got {self.elevation!r}")
        if self.align != "none" and self.up != DEFAULT_UP:
            raise UsageError(f"--align {self.align} sets the whole pose itself: leave --up at {DEFAULT_UP}")


@dataclass(frozen=True)
class Camera:
    """One view: world-space eye, orthonormal basis (right, up, back = towards the viewer), light."""

    eye: np.ndarray  # (3,)
    right: np.ndarray
    up: np.ndarray
    back: np.ndarray
    light: np.ndarray  # unit vector towards the light, world space
    near: float
    far: float
    tan_half_fov: float

    def view_matrix(self) -> np.ndarray:
        rot = np.stack([self.right, self.up, self.back]).astype(np.float64)
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = -rot @ self.eye
        return m

    def projection_matrix(self) -> np.ndarray:
        f = 1.0 / self.tan_half_fov
        n, fa = self.near, self.far
        return np.array(
            [
                [f, 0, 0, 0],
                [0, f, 0, 0],
                [0, 0, (fa + n) / (n - fa), 2 * fa * n / (n - fa)],
                [0, 0, -1, 0],
            ]
        )


def camera_distance(radius: float = 1.0) -> float:
    """Distance at which a sphere of ``radius`` (plus margin) exactly fits the vertical field of view."""
    return radius * FRAME_MARGIN / math.sin(math.radians(FOV_Y_DEG) / 2)


def _ring(settings: ViewSettings) -> np.ndarray:
    """Ring directions: azimuth i * 360/views degrees, view 0 on +z, counter-clockwise seen from +y,
    so camera i is camera 0 turned by R_y(i * 360/views) (view 1 of a mesh == view 0 of the mesh turned
    by R_y(-360/views))."""
    az = np.arange(settings.views) * (2 * math.pi / settings.views)
    el = math.radians(settings.elevation)
    return np.stack([math.cos(el) * np.sin(az), np.full_like(az, math.sin(el)), math.cos(el) * np.cos(az)], axis=1)


def _sphere(settings: ViewSettings) -> np.ndarray:
    """Fibonacci sphere about +y: equal-area bands, successive cameras a golden angle apart in azimuth.
    No camera sits on a pole (|y| <= 1 - 1/views), so each keeps a well-defined level horizon."""
    i = np.arange(settings.views)
    y = 1.0 - (2 * i + 1) / settings.views
    r = np.sqrt(np.maximum(0.0, 1.0 - y * y))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.sin(phi), y, r * np.cos(phi)], axis=1)


#: Camera layouts by name: unit directions from the origin towards each camera (views, 3).
LAYOUTS = {"ring": _ring, "sphere": _sphere}


def camera_positions(settings: ViewSettings, radius: float = 1.0) -> np.ndarray:
    """(views, 3) eyes of the layout, at the distance that frames a sphere of ``radius``."""
    return LAYOUTS[settings.layout](settings) * camera_distance(radius)


def cameras(settings: ViewSettings, radius: float = 1.0) -> list[Camera]:
    """Full cameras looking at the origin, near/far bracketing the bounding sphere. Every camera's
    right is level (perpendicular to +y), so the up axis is up in every image: a fixed in-plane
    orientation for any layout."""
    d = camera_distance(radius)
    lc = np.asarray(LIGHT_CAMERA_SPACE, dtype=np.float64)
    lc /= np.linalg.norm(lc)
    out = []
    for i, eye in enumerate(camera_positions(settings, radius)):
        back = eye / np.linalg.norm(eye)
        if math.hypot(back[0], back[2]) > 1e-9:
            right = np.array([back[2], 0.0, -back[0]]) / math.hypot(back[0], back[2])
        else:  # straight above or below (ring at +-90 degrees): the ring's own tangent
            a = i * 2 * math.pi / settings.views
            right = np.array([math.cos(a), 0.0, -math.sin(a)])
        up = np.cross(back, right)
        light = lc[0] * right + lc[1] * up + lc[2] * back
        out.append(
            Camera(
                eye=eye,
                right=right,
                up=up,
                back=back,
                light=light / np.linalg.norm(light),
                near=max(d - 1.1 * radius, 1e-3 * radius),
                far=d + 1.1 * radius,
                tan_half_fov=math.tan(math.radians(FOV_Y_DEG) / 2),
            )
        )
    return out


def posed(mesh: Mesh, rotation: np.ndarray | None) -> Mesh:
    """The mesh turned by a proper rotation (3x3) about its centre; the same mesh when None/identity."""
    if rotation is None or np.array_equal(rotation, np.eye(3)):
        return mesh
    from m3d.meshio import Mesh as _Mesh

    v = (np.asarray(mesh.vertices, dtype=np.float64) @ np.asarray(rotation, dtype=np.float64).T).astype(np.float32)
    return _Mesh(vertices=np.ascontiguousarray(v), faces=mesh.faces)


def bounding_radius(vertices: np.ndarray) -> float:
    """Frame radius: the unit sphere, or the vertices' own radius if a mesh pokes out of it."""
    if len(vertices) == 0:
        return 1.0
    return max(1.0, float(np.sqrt(np.max(np.einsum("ij,ij->i", vertices, vertices)))))


class Renderer(Protocol):
    def render(self, mesh: Mesh) -> np.ndarray: ...  # (views, size, size, 3) uint8, C-contiguous

    def close(self) -> None: ...


def _blank(settings: ViewSettings) -> np.ndarray:
    return np.full((settings.views, settings.size, settings.size, 3), BACKGROUND, dtype=np.uint8)


def _check_mesh(mesh: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    f = np.ascontiguousarray(mesh.faces, dtype=np.int32)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"expected vertices (V,3) and faces (F,3), got {v.shape} and {f.shape}")
    if len(f) and (int(f.min()) < 0 or int(f.max()) >= len(v)):  # out-of-range reads can crash a GL driver
        raise ValueError(f"face indices outside [0, {len(v)})")
    return v, f


_VERTEX_SHADER = """
#version 330
uniform mat4 mvp;
in vec3 in_pos;
out vec3 v_pos;
void main() {
    v_pos = in_pos;
    gl_Position = mvp * vec4(in_pos, 1.0);
}
"""

# Flat normal from screen-space derivatives of the world position: exact per triangle (position is
# linear over it), needs no per-face vertex expansion and no geometry shader. Turned towards the eye
# explicitly, so neither winding nor the derivative sign convention matters.
_FRAGMENT_SHADER = """
#version 330
uniform vec3 eye;
uniform vec3 light;
uniform float albedo;
uniform float ambient;
uniform float diffuse;
in vec3 v_pos;
out vec4 f_color;
void main() {
    vec3 n = cross(dFdx(v_pos), dFdy(v_pos));
    float len = length(n);
    n = len > 0.0 ? n / len : normalize(eye - v_pos);
    if (dot(n, eye - v_pos) < 0.0) n = -n;
    float c = albedo * (ambient + diffuse * max(dot(n, light), 0.0));
    f_color = vec4(c, c, c, 1.0);
}
"""


class ModernglRenderer:
    """OpenGL 3.3 through a headless EGL context (moderngl); one context per process, reused.

    All views of a mesh go into one tall framebuffer (one viewport per view) with a single vertex and
    index upload, and come back with one ``read_into`` into the output array: the projection is
    flipped vertically so GL's bottom-up rows land top-down, with no copy. Where views x size exceeds
    the driver's renderbuffer limit (or ``views_per_pass``), the views go in several passes.
    ``samples`` > 0 renders with MSAA (costs 2-4x on llvmpipe) and resolves before the read.
    """

    def __init__(
        self, settings: ViewSettings = ViewSettings(), *, samples: int = 0, views_per_pass: int | None = None
    ) -> None:
        self.settings = settings
        self.samples = int(samples)
        self._views_per_pass = views_per_pass
        try:
            import moderngl
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise M3DError(f"moderngl is not importable ({e}): install it, or use --renderer raycast") from None
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl", require=330)
        except Exception as e:
            msg = " ".join(str(e).split())
            raise M3DError(
                f"cannot create a headless OpenGL (EGL) context ({msg}): install the system packages "
                "libegl1 and libgl1 (Debian/Ubuntu), or use --renderer raycast"
            ) from None
        try:
            with self.ctx:
                self._setup()
        except BaseException:
            self.ctx.release()
            raise

    def _setup(self) -> None:
        ctx, s = self.ctx, self.settings
        self.prog = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.prog["albedo"].value = ALBEDO
        self.prog["ambient"].value = AMBIENT
        self.prog["diffuse"].value = DIFFUSE
        max_dim = min(int(ctx.info["GL_MAX_RENDERBUFFER_SIZE"]), int(ctx.info["GL_MAX_VIEWPORT_DIMS"][1]))
        if s.size > max_dim:
            raise M3DError(f"image size {s.size} exceeds this GL driver's limit of {max_dim} px")
        self.chunk = max(1, min(s.views, max_dim // s.size, self._views_per_pass or s.views))
        shape = (s.size, s.size * self.chunk)
        self.fbo = ctx.framebuffer(ctx.renderbuffer(shape, components=4), ctx.depth_renderbuffer(shape))
        self.msfbo = None
        if self.samples > 0:
            self.msfbo = ctx.framebuffer(
                ctx.renderbuffer(shape, components=4, samples=self.samples),
                ctx.depth_renderbuffer(shape, samples=self.samples),
            )
        self._radius: float | None = None
        self._uniforms: list[tuple[bytes, tuple[float, ...], tuple[float, ...]]] = []

    def _camera_uniforms(self, radius: float) -> list[tuple[bytes, tuple[float, ...], tuple[float, ...]]]:
        if radius != self._radius:
            flip = np.diag([1.0, -1.0, 1.0, 1.0])  # render upside down: rows read back top-first
            self._uniforms = [
                (
                    (flip @ c.projection_matrix() @ c.view_matrix()).T.astype("f4").tobytes(),
                    tuple(map(float, c.eye)),
                    tuple(map(float, c.light)),
                )
                for c in cameras(self.settings, radius)
            ]
            self._radius = radius
        return self._uniforms

    def render(self, mesh: Mesh) -> np.ndarray:
        s = self.settings
        v, f = _check_mesh(mesh)
        if len(f) == 0 or len(v) == 0:
            return _blank(s)
        uniforms = self._camera_uniforms(bounding_radius(v))
        out = np.empty((s.views, s.size, s.size, 3), dtype=np.uint8)
        with self.ctx:  # make this context current: another renderer in the process may own the thread
            self._draw(v, f, uniforms, out)
        return out

    def _draw(self, v: np.ndarray, f: np.ndarray, uniforms: list, out: np.ndarray) -> None:
        s, ctx = self.settings, self.ctx
        vbo = ibo = vao = None
        try:
            vbo = ctx.buffer(v)
            ibo = ctx.buffer(f)
            vao = ctx.vertex_array(self.prog, [(vbo, "3f", "in_pos")], index_buffer=ibo, index_element_size=4)
            ctx.enable(ctx.DEPTH_TEST)
            target = self.fbo if self.msfbo is None else self.msfbo
            view_bytes = s.size * s.size * 3
            for start in range(0, s.views, self.chunk):
                n = min(self.chunk, s.views - start)
                target.use()
                target.clear(1.0, 1.0, 1.0, 1.0, depth=1.0)
                for k in range(n):
                    mvp, eye, light = uniforms[start + k]
                    target.viewport = (0, k * s.size, s.size, s.size)
                    self.prog["mvp"].write(mvp)
                    self.prog["eye"].value = eye
                    self.prog["light"].value = light
                    vao.render()
                if self.msfbo is not None:
                    ctx.copy_framebuffer(self.fbo, self.msfbo)
                self.fbo.read_into(
                    out,
                    viewport=(0, 0, s.size, s.size * n),
                    components=3,
                    alignment=1,
                    write_offset=start * view_bytes,
                )
        finally:
            for obj in (vao, ibo, vbo):
                if obj is not None:
                    obj.release()

    def close(self) -> None:
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            ctx.release()
            self.ctx = None

    def __enter__(self) -> ModernglRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RaycastRenderer:
    """GL-free fallback: Open3D's RaycastingScene, every view's rays in one ``cast_rays`` call.

    Same cameras, same shading formula (the hit triangle's normal turned towards the ray origin),
    same background as ``ModernglRenderer``; one ray through each pixel centre, no anti-aliasing.
    ``threads`` is Open3D's thread count for the cast (0 = all cores).
    """

    def __init__(self, settings: ViewSettings = ViewSettings(), *, threads: int = 0) -> None:
        self.settings = settings
        self.threads = int(threads)
        try:
            import open3d as o3d
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name == "open3d":
                raise M3DError(RAYCAST_NEEDS) from None
            raise M3DError(  # installed, but a library it links against is missing
                f"open3d is not importable ({' '.join(str(e).split())}): install open3d (and the system "
                "package libusb-1.0-0 it links against), or use --renderer moderngl"
            ) from None
        self._o3d = o3d
        s = settings
        # Unit-radius rays, computed once: origins scale with the frame radius, directions do not.
        cams = cameras(s, 1.0)
        t = cams[0].tan_half_fov
        px = ((np.arange(s.size) + 0.5) / s.size * 2 - 1) * t  # camera x, left to right
        py = (1 - (np.arange(s.size) + 0.5) / s.size * 2) * t  # camera y, top row first
        gx, gy = np.meshgrid(px, py)  # (size, size)
        dirs = np.empty((s.views, s.size, s.size, 3), dtype=np.float64)
        for i, c in enumerate(cams):
            d = gx[..., None] * c.right + gy[..., None] * c.up - c.back
            dirs[i] = d / np.linalg.norm(d, axis=-1, keepdims=True)
        self._dirs = dirs.reshape(-1, 3).astype(np.float32)
        self._eyes = np.stack([c.eye for c in cams]).astype(np.float32)
        self._lights = np.stack([c.light for c in cams]).astype(np.float32)
        self._rays = np.empty((len(self._dirs), 6), dtype=np.float32)
        self._rays[:, 3:] = self._dirs
        self._radius: float | None = None

    def render(self, mesh: Mesh) -> np.ndarray:
        s, o3d = self.settings, self._o3d
        v, f = _check_mesh(mesh)
        if len(f) == 0 or len(v) == 0:
            return _blank(s)
        radius = bounding_radius(v)
        if radius != self._radius:
            per_view = s.size * s.size
            self._rays[:, :3] = np.repeat(self._eyes * radius, per_view, axis=0)
            self._radius = radius
        scene = o3d.t.geometry.RaycastingScene(nthreads=self.threads)
        scene.add_triangles(o3d.core.Tensor(v), o3d.core.Tensor(f.astype(np.uint32)))
        ans = scene.cast_rays(o3d.core.Tensor(self._rays), nthreads=self.threads)
        hit = np.isfinite(ans["t_hit"].numpy()).reshape(s.views, -1)
        normals = ans["primitive_normals"].numpy().reshape(s.views, -1, 3)
        dirs = self._dirs.reshape(s.views, -1, 3)
        out = np.full((s.views, s.size * s.size), BACKGROUND, dtype=np.uint8)
        for i in range(s.views):
            h = hit[i]
            n = normals[i][h]
            facing = np.einsum("ij,ij->i", n, dirs[i][h])
            n[facing > 0] *= -1  # two-sided: turn the normal towards the ray origin
            lam = np.maximum(n @ self._lights[i], 0.0)
            c = ALBEDO * (AMBIENT + DIFFUSE * lam)
            out[i][h] = np.rint(np.clip(c, 0.0, 1.0) * 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(out.reshape(s.views, s.size, s.size, 1), 3, axis=3))

    def close(self) -> None:
        self._rays = np.empty((0, 6), dtype=np.float32)

    def __enter__(self) -> RaycastRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RENDERER_CLASSES: dict[str, type] = {"moderngl": ModernglRenderer, "raycast": RaycastRenderer}


def raycast_available() -> bool:
    """Whether open3d is installed, without importing it (that takes a second)."""
    import importlib.util

    return importlib.util.find_spec("open3d") is not None


def create_renderer(settings: ViewSettings = ViewSettings(), **options: Any) -> Renderer:
    """The renderer ``settings.renderer``; M3DError if it is unavailable here (no silent fallback)."""
    return RENDERER_CLASSES[settings.renderer](settings, **options)


def coverage(views: np.ndarray) -> np.ndarray:
    """Fraction of non-background (not pure white) pixels per view, shape (views,); 0 = blank render."""
    views = np.asarray(views)
    return (views != BACKGROUND).any(axis=-1).mean(axis=(1, 2))


#: A view shows the object when at least this fraction of its pixels is object: more than a one-pixel
#: line across the whole frame (1/size: 0.45% at 224 px), a third of the smallest view of any LPSB mesh
#: (1.3% on the sphere, 2.2% on the ring). One rule for blank and nearly blank views alike.
MIN_COVERAGE = 0.005


def shown(views: np.ndarray) -> np.ndarray:
    """(views,) bool: which views show the object (coverage >= MIN_COVERAGE)."""
    return coverage(views) >= MIN_COVERAGE


def save_strip(views: np.ndarray, path: str | Path) -> None:
    """Write all views side by side, left to right in ring order, as one PNG."""
    from PIL import Image

    views = np.asarray(views, dtype=np.uint8)
    Image.fromarray(np.ascontiguousarray(np.concatenate(list(views), axis=1))).save(str(path), format="PNG")
