export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=offline
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
R=$PWD; cd /tmp
C="model=gpt_tiny train.max_steps=3 train.log_interval=1 train.eval_interval=0 train.micro_batch_size=4 train.global_batch_size=32 train.progress_bar=false train.bf16=false parallel.data_parallel_size=1"
for p in "parallel=pp2" "parallel=pp2_vpp2" "parallel=pp2_vpp2 model.share_embeddings_and_output_weights=false"; do echo "== $p"; CUDA_VISIBLE_DEVICES=0,1 timeout 100 python3 $R/train.py $C $p checkpoint.dir=/tmp/c$RANDOM 2>&1 | grep -E "^iter|rror" | cut -c1-200; done
