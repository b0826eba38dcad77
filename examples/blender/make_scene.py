"""Makes a tiny Cycles test scene, inside Blender: a textured plane, a
light and a camera, with the texture saved beside the .blend and referred
to by a relative path (`//textures/checker.png`), as a shot's assets are.

    blender -b --factory-startup --python make_scene.py -- OUT_DIR [SIZE [SAMPLES]]

Writes OUT_DIR/scene.blend and OUT_DIR/textures/checker.png. Cycles on the
CPU, SAMPLES samples (4 by default), no denoising (Debian's Blender has no
OpenImageDenoise), SIZE×(SIZE·9/16) pixels (64 by default). The plane
turns with the frame, so every frame differs.
"""

import math
import os
import sys

import bpy

argv = sys.argv[sys.argv.index("--") + 1:]
out = os.path.abspath(argv[0])
width = int(argv[1]) if len(argv) > 1 else 64
samples = int(argv[2]) if len(argv) > 2 else 4
os.makedirs(os.path.join(out, "textures"), exist_ok=True)

bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = samples
scene.cycles.use_denoising = False
scene.render.resolution_x = width
scene.render.resolution_y = max(width * 9 // 16, 1)
scene.render.resolution_percentage = 100
scene.frame_start, scene.frame_end = 1, 100

texture = bpy.data.images.new("checker", 16, 16)
pixels = []
for y in range(16):
    for x in range(16):
        on = (x // 4 + y // 4) % 2
        pixels += [0.9, 0.5 * on, 0.1, 1.0] if on else [0.1, 0.2, 0.8, 1.0]
texture.pixels = pixels
texture.filepath_raw = os.path.join(out, "textures", "checker.png")
texture.file_format = "PNG"
texture.save()

bpy.ops.mesh.primitive_plane_add(size=2)
plane = bpy.context.object
material = bpy.data.materials.new("checker")
material.use_nodes = True
nodes = material.node_tree.nodes
image_node = nodes.new("ShaderNodeTexImage")
image_node.image = texture
material.node_tree.links.new(image_node.outputs["Color"], nodes["Principled BSDF"].inputs["Base Color"])
plane.data.materials.append(material)
plane.rotation_euler = (0, 0, 0)
plane.keyframe_insert("rotation_euler", frame=1)
plane.rotation_euler = (0, 0, math.radians(360))
plane.keyframe_insert("rotation_euler", frame=101)

bpy.ops.object.light_add(type="SUN", location=(0, 0, 5))
bpy.ops.object.camera_add(location=(0, -3.5, 2.5), rotation=(math.radians(55), 0, 0))
scene.camera = bpy.context.object

blend = os.path.join(out, "scene.blend")
bpy.ops.wm.save_as_mainfile(filepath=blend)
texture.filepath = "//textures/checker.png"
bpy.ops.wm.save_as_mainfile(filepath=blend)
if os.path.exists(blend + "1"):
    os.remove(blend + "1")
print(f"made {blend}")
