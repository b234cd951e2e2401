"""mmgan_jax: robust multi-modal GAN with feature alignment and diffusion refinement."""
