"""PrivFusion's core, plain PyTorch: party models, permutation specs, neuron matching, the party's release, the
fusion of releases, the decentralized exchange protocol and the perturbation filter adapter."""
