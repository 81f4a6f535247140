"""Runs inside Blender: import a GLB the way a user does, describe what arrived, optionally render it.

    blender -b --factory-startup --python tests/blender_import.py -- MESH.glb REPORT.json [RENDER.png [SIZE]]

The report: every mesh object with its face count, world bounding box (Blender's frame: +Z up, the
glTF front +Z becomes -Y), materials, and for each material the image wired to the Principled
BSDF's Base Color (size and mean colour). The render (Cycles on the CPU) looks at the object's front
from 30 degrees to its right and 20 degrees up, lit by a sun and a grey sky.
"""

import json
import math
import sys

import numpy

if not hasattr(numpy, "bool"):  # Blender 3.4's glTF importer uses the alias NumPy 1.24 removed
    numpy.bool = bool

import bpy  # noqa: E402
from mathutils import Vector  # noqa: E402


def base_color_image(material):
    if material is None or not material.use_nodes:
        return None
    for node in material.node_tree.nodes:
        if node.type == "BSDF_PRINCIPLED":
            links = node.inputs["Base Color"].links
            if links and links[0].from_node.type == "TEX_IMAGE" and links[0].from_node.image is not None:
                image = links[0].from_node.image
                w, h = image.size
                pixels = numpy.array(image.pixels[:], dtype=numpy.float32).reshape(-1, image.channels)
                return {"name": image.name, "width": w, "height": h,
                        "mean": pixels[:, :3].mean(0).tolist(), "std": pixels[:, :3].std(0).tolist()}
    return None


def describe():
    objects = []
    for obj in bpy.context.scene.objects:
        if obj.type != "MESH":
            continue
        corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
        verts = numpy.array([list(obj.matrix_world @ v.co) for v in obj.data.vertices])
        normals = numpy.array([list((obj.matrix_world.to_3x3() @ p.normal).normalized()) for p in obj.data.polygons])
        areas = numpy.array([p.area for p in obj.data.polygons])
        # area-weighted mean angle between each face's normal and the nearest world axis: ~0 for
        # a box whose faces are flat (and axis-aligned), larger the more its faces are dented
        axis_error = numpy.degrees(numpy.arccos(numpy.clip(numpy.abs(normals).max(1), 0, 1)))
        z_lo, z_hi = verts[:, 2].min(), verts[:, 2].max()
        top = verts[verts[:, 2] > z_hi - 0.1 * (z_hi - z_lo)]
        bottom = verts[verts[:, 2] < z_lo + 0.1 * (z_hi - z_lo)]
        objects.append({
            "name": obj.name,
            "faces": len(obj.data.polygons),
            "vertices": len(obj.data.vertices),
            "bbox_min": [min(c[i] for c in corners) for i in range(3)],
            "bbox_max": [max(c[i] for c in corners) for i in range(3)],
            # horizontal spread of the top and bottom tenths of the height (a cone's apex is narrow)
            "top_width": float(numpy.ptp(top[:, :2], axis=0).max()),
            "bottom_width": float(numpy.ptp(bottom[:, :2], axis=0).max()),
            "axis_normal_error_deg": float((axis_error * areas).sum() / max(areas.sum(), 1e-12)),
            "materials": [{"name": m.name if m else None, "base_color_image": base_color_image(m),
                           "metallic": m.node_tree.nodes["Principled BSDF"].inputs["Metallic"].default_value
                           if m and m.use_nodes and "Principled BSDF" in m.node_tree.nodes else None}
                          for m in obj.data.materials],
        })
    return {"blender": bpy.app.version_string, "mesh_objects": objects}


def render(path, size):
    scene = bpy.context.scene
    objs = [o for o in scene.objects if o.type == "MESH"]
    lo = Vector([min((o.matrix_world @ Vector(c))[i] for o in objs for c in o.bound_box) for i in range(3)])
    hi = Vector([max((o.matrix_world @ Vector(c))[i] for o in objs for c in o.bound_box) for i in range(3)])
    centre, radius = (lo + hi) / 2, (hi - lo).length / 2
    az, el, dist = math.radians(30), math.radians(20), 3.2 * radius
    cam_data = bpy.data.cameras.new("camera")
    cam_data.lens = 50
    cam = bpy.data.objects.new("camera", cam_data)
    scene.collection.objects.link(cam)
    cam.location = centre + Vector((dist * math.cos(el) * math.sin(az), -dist * math.cos(el) * math.cos(az),
                                    dist * math.sin(el)))
    cam.rotation_euler = (centre - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam
    sun_data = bpy.data.lights.new("sun", "SUN")
    sun_data.energy = 3.0
    sun = bpy.data.objects.new("sun", sun_data)
    sun.rotation_euler = (math.radians(40), 0, math.radians(30))
    scene.collection.objects.link(sun)
    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.6, 0.6, 0.6, 1)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.8
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.film_transparent = False
    scene.view_settings.view_transform = "Standard"
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)


def main():
    args = sys.argv[sys.argv.index("--") + 1:]
    glb, report = args[0], args[1]
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=glb)
    with open(report, "w") as f:
        json.dump(describe(), f, indent=1)
    if len(args) > 2:
        render(args[2], int(args[3]) if len(args) > 3 else 256)


main()
