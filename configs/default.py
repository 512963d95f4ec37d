"""Default CAL configuration: the paper's recipe (Sec. 4.1) on SYSU-MM01.

Every field is documented here; the other files in `configs/` override a few.

Run:
  python -m cal_jax.main --config configs/default.py --workdir DIR \
      --config.data.manual_dir=/path/to/SYSU-MM01

The paper's target (SYSU-MM01): docs/results.md, "The paper's targets".

The objective is the paper's Eq. (20) as written (`config.formulation = 'paper'`); the
project's measured variant is `--config.formulation=measured` (cal_jax/config/formulations.py and
docs/results.md, "Two formulations", list each field where they differ, with the evidence).
A real data set needs `config.model.pretrained`: the torchvision ResNet-50 ImageNet state
dict (resnet50-0676ba61.pth or resnet50-19c8e357.pth), or `none` to train from scratch.
"""

import ml_collections

from cal_jax.config import formulations


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 0  # 0: evaluate at the end only
  config.keep_checkpoints = 3  # the last N, plus the best by evaluation mAP
  config.profile = False  # a CLU profile of a few steps, in the workdir

  # ---------------------------------------------------------------- data ---
  config.data = ml_collections.ConfigDict()
  config.data.name = 'sysu_mm01'  # tfds builder: sysu_mm01 | regdb | llcm | ...
  config.data.builder_config = ''  # e.g. "trial_1" for RegDB
  config.data.manual_dir = ''  # the data set's folder as its owners distribute it
  config.data.synthetic = ''  # "sysu" | "regdb" | "llcm": generate a synthetic set
  config.data.synthetic_num_ids = 96
  config.data.synthetic_height = 128
  config.data.synthetic_infrared_gap = 1.0  # 1: hard cross-modal gap; 0: luminance
  config.data.synthetic_test_ids = 0  # sysu: test identities; 0: a third of them
  config.data.synthetic_seed = -1  # draws the synthetic identities; -1: config.seed
  # True: people framed as a detector's boxes frame them (random scale, vertical crop,
  # horizontal offset, occluders), so a fixed position is no longer a fixed body part;
  # False: each stands near the middle at about the same size (the embedded configs).
  config.data.synthetic_misalignment = False
  config.data.data_dir = ''  # tfds data_dir for prepared data ("" = tfds default)
  config.data.skip_corrupt_images = False  # True: leave unreadable images out, logged by name
  config.data.image_height = 288
  config.data.image_width = 144
  config.data.num_ids_per_batch = 8  # P: identities per global batch
  config.data.num_pos = 4  # K: images per identity and modality
  config.data.pad = 10  # pad-and-random-crop padding, pixels
  config.data.flip = True
  config.data.random_erasing = 0.5  # probability, 0 disables
  config.data.channel_aug = True  # CAJ channel augmentation (see decisions)
  config.data.channel_aug_prob = 0.5  # share of visible images channel-exchanged
  config.data.balanced_sampler = False  # True: no identity twice per pass (not AGW)
  config.data.prefetch = 2
  config.data.eval_batch_size = 128
  config.data.eval_flip = False  # True: average with the mirror (AGW does not)

  # --------------------------------------------------------------- model ---
  config.model = ml_collections.ConfigDict()
  config.model.depth = 50  # ResNet depth: 18 | 34 | 50 | 101
  config.model.width = 64  # channels of the stem; 64 is torchvision's ResNet
  config.model.last_stride = 1  # ReID convention: keep 18x9 maps at 288x144
  config.model.modality_specific_stem = True  # AGW: conv1..layer0 per modality
  config.model.num_parts = 4  # N_p
  config.model.select_ratio = 0.6  # alpha of Eq. (3)
  config.model.pool_sizes = (1, 3, 5)  # DRM multi-scale max-pooling
  config.model.shared_region_mining = False  # ablation "Shared DRM"
  config.model.adapter_hidden = 512  # width of the TSAA MLPs (Eq. 10)
  config.model.adapter_dim = 256  # d: output width of the similarity MLPs
  config.model.channel_reduction = 16  # TSAA channel-attention MLP: C -> C/16 -> C
  # Table 4's ablations (not exported to PyTorch): the part queries P are DRM's
  # part features, or "learnable" (LV) vectors, or "horizontal" (HS) stripes;
  # the similarity is Eq. (9), or "scaled_dot" (SD, Eq. 6); channel attention on.
  config.model.part_queries = 'drm'
  config.model.attention_similarity = 'tsaa'
  config.model.channel_attention = True
  # Not in the paper: tokens within this many rows or columns of the feature map's edge are
  # left out of Eq. (9)'s softmax (their receptive fields reach the zero padding); 0: none.
  config.model.attention_border = 0
  # Not in the paper: IN(T) (Eq. 7) minus its mean over images at each token position before
  # theta_1 (a running mean in evaluation), so that no key is a code of its position alone.
  config.model.attention_centring = False
  # L_id's classifier of the refined parts: "shared" by all parts (the default), or
  # "per_part": one per part query and modality (not in the paper;
  # docs/decisions/model_and_losses.md).
  config.model.id_classifier = 'shared'
  config.model.embedding = 'parts'  # test-time feature: "parts" (CAL) | "global" (baseline)
  # The torchvision ResNet state dict (.pth / .safetensors) the backbone starts from. Real
  # data sets refuse '' (no silent from-scratch run); 'none' trains from scratch on purpose,
  # and then the backbone trains at the full learning rate (optim.backbone_lr_mult ignored).
  config.model.pretrained = ''
  # Mixed precision: "bfloat16" runs the backbone in bf16 (float32 parameters, optimizer
  # state, batch-norm statistics, heads, softmaxes and losses); faster on GPUs and TPUs only.
  config.model.dtype = 'float32'
  config.model.remat = ()  # ResNet stages (1-4) rematerialised, e.g. (1, 2, 3, 4): less memory
  # With remat: each of those stages also as a whole (one more forward pass, far less memory).
  config.model.remat_nested = True

  # ---------------------------------------------------------------- loss ---
  config.loss = ml_collections.ConfigDict()
  config.loss.id = 1.0  # L_id of Eq. (20): identity loss on the refined part features
  config.loss.pcl = 1.0
  config.loss.kd2 = 1.0  # lambda_2
  config.loss.dis = 0.1  # lambda_3
  config.loss.div = 0.1  # lambda_4
  config.loss.pcl_margin = 0.6  # sigma of Eq. (15)
  # What Eq. (15) compares: "unit_parts" (each part L2-normalised, so that sigma = 0.6 is
  # on the scale of unit vectors; the paper does not say) or "raw" (the TSAA outputs).
  config.loss.pcl_features = 'unit_parts'
  config.loss.pcl_form = 'pcl'  # "pcl": Eq. (14); Table 4: "triplet" | "center" | "ica_cca"
  # MCLNet's margins for "ica_cca" on unit part features (its 4500 and 8 were for raw
  # 2,048-d features): centres at least rho apart (2: orthogonal unit vectors), and
  # sigma keeping MCLNet's ratio sigma / rho = 8 / 4500.
  config.loss.mcca_rho = 2.0
  config.loss.mcca_sigma = 0.0036
  config.loss.query_matching = True  # CQM: Hungarian matching (Eq. 17); False: identity
  config.loss.attention_div = 0.0  # diversity of the TSAA maps (not in the paper)
  config.loss.attention_div_form = 'dot'  # "dot": Eq. (5)'s form; "cosine": of the maps
  # Each part's self-refinement map S pulled towards its DRM region (not in the paper;
  # the row `tsaa_guided` is 1; docs/decisions/model_and_losses.md, "Guiding TSAA to
  # DRM's regions").
  config.loss.attention_guidance = 0.0
  # Paper silent; followed the distillation code of the family: the cross-refined
  # teachers of L_kd1 / L_kd2 are constants (False: an ablation row).
  config.loss.stop_teacher_gradient = True
  # The fields where the paper and the measured variant differ, written by the
  # formulation (cal_jax/config/formulations.py): loss.kd1 (lambda_1), loss.kd1_form (Eq. 18:
  # "dot"; "cosine" | "kl" | "mse" align the maps), loss.kd2_attention_gradient (Eq. 19
  # through the TSAA maps), loss.global_id (an identity loss on the pooled map, not in
  # Eq. 20) and loss.pcl_reduction (Eqs. 14-15: "sum" over every (i, j), or
  # "normalised_mean": per-part distances, a mean per term).
  formulations.apply(config, 'paper')

  # ------------------------------------------------------------ optimiser ---
  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 0.1  # for the global batch of P*2K = 64 images
  config.optim.warmup_start_lr = 0.01
  config.optim.final_lr = 1e-3
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.backbone_lr_mult = 0.1  # AGW: pretrained ResNet at 0.1 x lr
  config.optim.weight_decay = 5e-4
  config.optim.num_epochs = 100
  config.optim.warmup_epochs = 10
  config.optim.steps_per_epoch = 0  # 0: as the standard codebases (see decisions)

  # ---------------------------------------------------------- evaluation ---
  config.eval = ml_collections.ConfigDict()
  config.eval.enabled = True  # evaluate at the end of training (and every eval_every_steps)
  config.eval.num_trials = 10  # gallery draws (SYSU-MM01, LLCM)
  config.eval.rand_perm_path = ''  # SYSU exp/rand_perm_cam.mat: MATLAB galleries
  # k-reciprocal re-ranking (Zhong et al. 2017) of every protocol's distances; off as in the
  # paper ("tested without re-ranking"); k1, k2, lambda are the values torchreid and fast-reid use.
  config.eval.rerank = False
  config.eval.rerank_k1 = 20
  config.eval.rerank_k2 = 6
  config.eval.rerank_lambda = 0.3
  # WORKDIR/eval_features.npz: a checkpoint's test features, so that evaluating it again
  # (other protocols, trials, gallery draws) re-embeds nothing; keyed by step and weights.
  config.eval.cache_features = True
  config.eval.progress_seconds = 30.0  # at most one evaluation progress line per N seconds
  config.eval.pictures = True  # DRM regions, TSAA attention, ranked lists, CMC to TensorBoard

  return config
