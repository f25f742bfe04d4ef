"""export_gguf.py: a merged model written as GGUF with llama.cpp's own converter, read back with the gguf package;
in the slow set, llama.cpp's llama-mtmd-cli, built from the same source, captions a training image as infer.py does."""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import COLOR_CAPTIONS, PHOTO_SHAPES, check, make_imagefolder, run, serving
from testkit.outside_tools import llama_cpp_tool
from testkit.tiny_models import BUILDERS

PROJECTORS = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}


def merged_with_real_tokenizer(family, work, *training):
    """A tiny model of the family with Qwen2's real tokenizer, trained on the colour photos (of several shapes) and
    merged."""
    model = BUILDERS[family](str(work / "tiny"), real_tokenizer=True)
    check(run("data2csv.py", f"--source={make_imagefolder(work / 'source', shapes=PHOTO_SHAPES)}", cwd=work))
    check(run("csv2json.py", cwd=work))
    check(run("train.py", f"--model={model}", "--test_size=2", "--image_size=56", "--swanlab_mode=disabled",
              "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1", "--dataloader_num_workers=0",
              *training, cwd=work))
    check(run("merge.py", cwd=work))
    return work / "output" / "Qwen2-VL-2B-merged"


def field(reader, name):
    return reader.fields[name].contents()


@pytest.mark.slow  # a minute each: make test exports Qwen3.5 (test_qwen35.py), CI every family
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_export_writes_gguf_files_that_the_gguf_reader_validates(family, tmp_path, llama_cpp):
    from gguf import GGUFReader

    merged = merged_with_real_tokenizer(family, tmp_path, "--max_steps=1")
    exported = check(run("export_gguf.py", f"--llama_cpp={llama_cpp}", cwd=tmp_path))
    gguf_dir = tmp_path / "output" / "Qwen2-VL-2B-gguf"
    assert sorted(os.listdir(gguf_dir)) == ["Modelfile", "mmproj-f16.gguf", "model-f16.gguf", "model-q8_0.gguf"]
    assert "--prompt" not in exported.stdout  # at most 56x56 pixels, 2x2 tokens of 28x28; at least one
    assert "-p 'COCO Yes:' --jinja --temp 0 --image-min-tokens 1 --image-max-tokens 4" in exported.stdout

    weights = load_file(merged / "model.safetensors")
    for outtype, quantised in (("f16", "F16"), ("q8_0", "Q8_0")):
        text = GGUFReader(gguf_dir / f"model-{outtype}.gguf")
        assert field(text, "general.architecture") == "qwen2vl"
        assert field(text, "qwen2vl.rope.dimension_sections") == [2, 3, 3, 0]  # mrope_section, padded to four
        assert field(text, "qwen2vl.block_count") == 2 and field(text, "qwen2vl.embedding_length") == 64
        assert field(text, "tokenizer.ggml.pre") == "qwen2" and len(field(text, "tokenizer.ggml.tokens")) == 151936
        assert field(text, "tokenizer.ggml.eos_token_id") == 151645  # <|im_end|>
        tensors = {tensor.name: tensor for tensor in text.tensors}
        assert len([name for name in tensors if name.startswith("blk.")]) == 2 * 12  # q,k,v (+bias), o, mlp, norms
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == quantised
        embedding = tensors["token_embd.weight"]
        assert list(embedding.shape) == [64, 151936]
        if outtype == "f16":  # the merged weights, rounded to f16
            expected = weights["model.embed_tokens.weight"].half().numpy()
            assert np.array_equal(np.asarray(embedding.data).reshape(expected.shape), expected)

    mmproj = GGUFReader(gguf_dir / "mmproj-f16.gguf")
    assert field(mmproj, "clip.projector_type") == PROJECTORS[family]
    assert field(mmproj, "clip.vision.image_size") == 56  # the training size goes with it
    assert field(mmproj, "clip.vision.patch_size") == 14 and field(mmproj, "clip.vision.block_count") == 3
    assert (gguf_dir / "Modelfile").read_text().count("\nFROM ./") == 2


@pytest.fixture(scope="module")
def exported(llama_cpp, tmp_path_factory):
    """A tiny Qwen2-VL with Qwen2's real tokenizer that has learnt the colour photos of several shapes, merged and
    exported as GGUF (f16)."""
    work = tmp_path_factory.mktemp("gguf_run")
    merged_with_real_tokenizer("qwen2_vl", work, "--max_steps=150", "--learning_rate=5e-3", "--save_steps=1000")
    check(run("export_gguf.py", f"--llama_cpp={llama_cpp}", "--outtypes=f16", cwd=work))
    return work, work / "output" / "Qwen2-VL-2B-gguf"


COLORS = ["red", "green", "blue"]  # sized 56x56, 28x56 and 112x28 by the processor


@pytest.mark.slow
def test_llama_cpp_captions_training_photos_of_every_shape_as_infer_does(exported, llama_cpp):
    work, gguf_dir = exported
    images = [work / "coco_2014_caption" / f"{color}.jpg" for color in COLORS]
    inferred = check(run("infer.py", f"--images={','.join(map(str, images))}", "--max_new_tokens=16",
                         "--output_path=photos.jsonl", cwd=work))
    for image, color in zip(images, COLORS):
        assert f"{image}: {COLOR_CAPTIONS[color]}" in inferred.stdout
    for image, color in zip(images, COLORS):  # with the token bounds export_gguf.py prints
        captioned = subprocess.run(
            [llama_cpp_tool("llama-mtmd-cli"), "-m", gguf_dir / "model-f16.gguf", "--mmproj",
             gguf_dir / "mmproj-f16.gguf", "--image", image, "-p", "COCO Yes:", "--jinja", "--temp", "0",
             "-n", "16", "--image-min-tokens", "1", "--image-max-tokens", "4"],
            capture_output=True, text=True, timeout=300)
        assert captioned.returncode == 0, captioned.stderr[-3000:]
        assert captioned.stdout.strip() == COLOR_CAPTIONS[color], color + captioned.stdout + captioned.stderr[-2000:]


@pytest.fixture(scope="module")
def llama_server(exported, llama_cpp):
    """llama-server on the exported GGUF and mmproj with training's token bounds, on 127.0.0.1, started once."""
    work, gguf_dir = exported
    binary = llama_cpp_tool("llama-server")
    with serving(lambda port: [binary, "-m", gguf_dir / "model-f16.gguf", "--mmproj", gguf_dir / "mmproj-f16.gguf",
                               "--image-min-tokens", "1", "--image-max-tokens", "4", "--host", "127.0.0.1",
                               "--port", str(port)], "/health", work / "llama_server.log", timeout=300) as url:
        yield url


@pytest.mark.slow
def test_verify_asks_llama_server_over_http_and_llama_mtmd_cli_and_both_give_infer_s_captions(exported, llama_cpp,
                                                                                               llama_server):
    """Photos of three shapes sent to llama-server as base64 data URLs, and given to llama-mtmd-cli, by verify.py."""
    work, gguf_dir = exported
    images = ",".join(str(work / "coco_2014_caption" / f"{color}.jpg") for color in COLORS)
    cli = llama_cpp_tool("llama-mtmd-cli")
    result = check(run("verify.py", f"--images={images}", "--max_new_tokens=16", "--report_dir=verified",
                       f"--server={llama_server}", f"--llama_mtmd_cli={cli}", f"--gguf_dir={gguf_dir}", cwd=work))
    rows = {row["engine"]: row for row in json.loads((work / "verified" / "verify.json").read_text())["engines"]}
    for engine in ("server", "llama-mtmd-cli (GGUF)", "transformers (merged)"):
        assert (rows[engine]["equal"], rows[engine]["of"]) == (3, 3), (engine, result.stdout)
    assert list(rows["server"]["captions"].values()) == [COLOR_CAPTIONS[color] for color in COLORS]
