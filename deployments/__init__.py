"""Ray Serve deployments: the graph is Ingress -> ImageLoader -> Detector -> Postprocess."""
