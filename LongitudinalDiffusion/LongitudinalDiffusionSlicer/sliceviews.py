"""Real Slicer slice views rendered offscreen, for pictures and tests without the application.

Inside 3D Slicer the layout manager owns the slice views; outside it (batch, CI) PyPI
``trame-slicer`` builds the same ``vtkMRMLSliceLogic`` + displayable managers around a
render window, so a volume and its segmentation overlay are drawn by Slicer's own slice
pipeline (reslicing, window/level, segment fill and outline), not re-drawn by hand.
:class:`OffscreenSliceView` wraps one such view (the red, axial one by default) on any scene
bootstrapped by :mod:`.headless`; no X server is needed (VTK uses EGL or OSMesa).

:func:`renderFrames` selects frames of a sequence browser one after the other and renders
each with the browser's proxy volume in the background, the slice through the frame's centre
and the proxy segmentation overlaid.

Example (outside Slicer)::

    from LongitudinalDiffusionSlicer import headless, sliceviews
    app = headless.bootstrapScene()
    ...  # results.placeResult(...) puts a frame series into app.scene
    with sliceviews.OffscreenSliceView(app.scene, app.applicationLogic) as view:
        pictures = sliceviews.renderFrames(view, placed.sequences[0], [0, 3, 7])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OffscreenSliceView", "composeFrames", "renderFrames", "unavailableReason"]


def unavailableReason() -> str:
    """Why slice views cannot be rendered offscreen here ("" when they can)."""
    try:
        import trame_slicer.views  # noqa: F401
    except ImportError as exc:
        return f"PyPI trame-slicer is not installed ({exc}); see requirements/slicer-render.txt"
    return ""


def _preferHeadlessOpenGL() -> None:
    # Without an X server VTK falls back to EGL anyway; asking for it first skips the X attempt.
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


class OffscreenSliceView:
    """One Slicer slice view (slice logic, displayable managers, render window), offscreen.

    Args:
        scene: the MRML scene to show.
        applicationLogic: the scene's ``vtkSlicerApplicationLogic`` (the view's slice logic
            registers with it, as in Slicer).
        name: the slice node's layout name (``"Red"``: the axial view).
        orientation: ``"Axial"``, ``"Coronal"`` or ``"Sagittal"``.
        size: (width, height) in pixels.
    """

    def __init__(
        self,
        scene: Any,
        applicationLogic: Any,
        *,
        name: str = "Red",
        orientation: str = "Axial",
        size: tuple[int, int] = (320, 320),
    ) -> None:
        reason = unavailableReason()
        if reason:
            raise RuntimeError(reason)
        _preferHeadlessOpenGL()
        import slicer
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition, ViewProps, ViewType

        self.scene = scene
        self.applicationLogic = applicationLogic
        if scene.GetDefaultNodeByClass("vtkMRMLSliceNode") is None:
            # What the application does at start-up: the Axial/Sagittal/Coronal presets, in
            # Slicer's radiological convention (patient right on screen left).
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        self._factory = DirectViewFactory(do_render_offscreen=True)
        layout = ViewLayoutDefinition(name, ViewType.SLICE_VIEW, ViewProps(orientation=orientation))
        self.view = self._factory.create_view(layout, scene, applicationLogic)
        self.resize(*size)

    # ------------------------------------------------------------------ nodes

    @property
    def sliceNode(self) -> Any:
        return self.view.get_view_node()

    @property
    def sliceLogic(self) -> Any:
        return self.view._logic

    def resize(self, width: int, height: int) -> None:
        self.view.render_window().SetSize(int(width), int(height))
        self.view.update_size(int(width), int(height))

    def show(self, background: Any, foreground: Any = None, foregroundOpacity: float = 0.0) -> None:
        """Put volume nodes in the background (and foreground) layers of this view."""
        composite = self.sliceLogic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(foregroundOpacity))

    def fitToBackground(self) -> None:
        """Fit the field of view to the background volume and cut through its centre.

        ``FitSliceToBackground`` centres the view on the volume in all three directions, so
        frames of different fields of view are each cut through their own middle.
        """
        self.view.fit_view_to_content()

    def centreOffset(self, volume: Any) -> float:
        """The slice offset (mm along the view's normal) through the centre of ``volume``."""
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        centre = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
        sliceToRas = self.sliceNode.GetSliceToRAS()
        normal = np.array([sliceToRas.GetElement(i, 2) for i in range(3)])
        return float(np.dot(centre, normal))

    def setSliceOffset(self, offset: float) -> None:
        self.sliceLogic.SetSliceOffset(float(offset))

    def sliceOffset(self) -> float:
        return float(self.sliceLogic.GetSliceOffset())

    # ------------------------------------------------------------------ pixels

    def render(self) -> np.ndarray:
        """Render now; the view's pixels as an (height, width, 3) uint8 RGB array, top row first."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        self.view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.view.render_window())
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])  # VTK's first row is the bottom one

    def save(self, path: str | os.PathLike) -> Path:
        """Render and write a PNG."""
        from PIL import Image as PILImage

        path = Path(path)
        PILImage.fromarray(self.render()).save(path)
        return path

    def close(self) -> None:
        """Release the view (its slice logic leaves the application logic)."""
        view, self.view = self.view, None
        if view is None:
            return
        logics = self.applicationLogic.GetSliceLogics()
        if logics is not None:
            logics.RemoveItem(view._logic)
        view.finalize()

    def __enter__(self) -> OffscreenSliceView:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _segmentationDisplays(scene: Any) -> list[Any]:
    displays = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        display = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode").GetDisplayNode()
        if display is not None:
            displays.append(display)
    return displays


def renderFrames(
    view: OffscreenSliceView,
    series: Any,
    indices: Iterable[int],
    *,
    overlay: bool = True,
    opacity: float = 0.6,
) -> list[np.ndarray]:
    """Render frames of a placed frame series (a :class:`~.results.PlacedSeries`).

    For each index the series' browser selects the frame (the proxy volume and the proxy
    segmentation follow), the view shows the proxy volume in the background, fits to it and
    cuts through its centre; with ``overlay`` the proxy segmentation is drawn over it (and
    no other segmentation, so the picture shows this frame's labels only).

    Returns:
        one RGB array per index (see :meth:`OffscreenSliceView.render`).
    """
    from . import results

    scene = view.scene
    saved = [(d, d.GetVisibility()) for d in _segmentationDisplays(scene)]
    pictures = []
    try:
        for index in indices:
            proxy = results.selectFrame(series.browser, index)
            segmentation = series.proxySegmentation()
            for display, _visible in saved:
                display.SetVisibility(False)
            if overlay and segmentation is not None:
                display = segmentation.GetDisplayNode()
                if display is None:
                    segmentation.CreateDefaultDisplayNodes()
                    display = segmentation.GetDisplayNode()
                display.SetVisibility(True)
                display.SetVisibility2DFill(True)
                display.SetVisibility2DOutline(True)
                display.SetOpacity2DFill(opacity * 0.5)
                display.SetOpacity2DOutline(opacity)
            view.show(proxy)
            view.fitToBackground()
            view.setSliceOffset(view.centreOffset(proxy))
            pictures.append(view.render())
    finally:
        for display, visible in saved:
            display.SetVisibility(visible)
    return pictures


def composeFrames(
    pictures: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    gap: int = 6,
) -> Path:
    """Put rendered views side by side, each captioned, in one PNG (pixels unchanged)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    titleFont = ImageFont.load_default(size=13)
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    top = (24 if title else 0) + 24
    canvas = PILImage.new("RGB", (width, height + top), "black")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, 4), title, fill="white", font=titleFont, anchor="mt")
    x = 0
    for picture, caption in zip(pictures, captions):
        canvas.paste(PILImage.fromarray(picture), (x, top))
        draw.text((x + picture.shape[1] // 2, top - 20), caption, fill="white", font=font, anchor="mt")
        x += picture.shape[1] + gap
    path = Path(path)
    canvas.save(path)
    return path
