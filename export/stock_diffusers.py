"""The stock diffusers baseline of ``unidg bench gpu --all``'s end-to-end rows: one sample the way a diffusers user
runs FLUX.1-Fill with the key bias, on the same model and inputs as the project's sample."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import FlowMatchEulerDiscreteScheduler

from unidg.core.schedule import flux_mu
from unidg.export.bench_gpu_all_session import STOCK_ATTENTION, GpuSession, StepConfig
from unidg.train.model import unpack_latents


def stock_sample(session: GpuSession) -> Callable[[], object]:
    """One sample the stock way: the same stages, the unfolded context with the bias as a float attention mask,
    diffusers' FlowMatchEulerDiscreteScheduler stepping on the host, eager."""
    torch, model = session.torch, session.model
    session.use(StepConfig(attention=STOCK_ATTENTION))
    transformer = model.transformer
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    n_image = session.layout.image_tokens
    dtype = session.dtype

    def sample():
        with torch.inference_mode():
            reference = model.encode_reference(session.reference)
            ctx, txt_ids = model.context(reference, fold_text=False)
            cond = model.build_condition(session.diptych, session.diptych_mask).to(dtype)
            mask = model.key_bias(session.defect.to(session.device), fold_text=False).to(dtype)[:, None, None, :]
            scheduler.set_timesteps(
                sigmas=[1.0 - i / session.steps for i in range(session.steps)],
                mu=flux_mu(n_image),
                device=session.device,
            )
            latents = session.noise.to(dtype)
            pooled = torch.zeros(1, transformer.config.pooled_projection_dim, device=session.device, dtype=dtype)
            guidance = torch.full((1,), float(model.settings.guidance), device=session.device)
            for t in scheduler.timesteps:
                v = transformer(
                    hidden_states=torch.cat([latents, cond], dim=2),
                    encoder_hidden_states=ctx.to(dtype),
                    pooled_projections=pooled,
                    timestep=(t / 1000).expand(1).to(latents.dtype),
                    img_ids=session.folded.img_ids,
                    txt_ids=txt_ids,
                    guidance=guidance if transformer.config.guidance_embeds else None,
                    joint_attention_kwargs={"attention_mask": mask},
                    return_dict=False,
                )[0]
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
            return model.decode_latents(unpack_latents(latents, session.h_tokens, session.w_tokens))

    return sample
