"""Pure logic of the Label Studio MMDetection backend.

Everything here is plain Python (no Ray): Label Studio config parsing, label
mapping, box-to-region conversion, image decoding and fetching, model file
resolution and batched inference. The Ray Serve deployments in
`deployments/` are thin wrappers around these functions.
"""
