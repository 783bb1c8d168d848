//! The CUDA backend: the driver API, NVRTC and cuBLAS through cudarc, all loaded at run time, so the
//! same binary builds and runs on machines without CUDA and touches a GPU only when asked to.
//!
//! Kernels are the CUDA C in `kernels.cu`, compiled with NVRTC for the device's compute capability the
//! first time a process needs them and cached on disk per device (`~/.cache/moeval/kernels`). Dense
//! matmuls go to cuBLAS (bf16 inputs, f32 accumulation and output).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

pub(crate) use model::{CudaModel, SeqCache};

pub(crate) fn cfg1(grid: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches kernel `$name` with the given arguments (locals, so they outlive the launch).
macro_rules! launch {
    ($gpu:expr, $name:literal, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let gpu: &Gpu = $gpu;
        let mut b = gpu.stream.launch_builder(gpu.kernel($name));
        $( b.arg(&$arg); )*
        gpu.timed($name, || {
            // SAFETY: the arguments match the kernel's signature in kernels.cu, and every buffer they
            // address is alive and large enough until the stream has run the launch.
            unsafe { b.launch($cfg) }
                .map(|_| ())
                .map_err(|e| device_err(concat!("kernel ", $name), e))
        })
    }};
}

mod model;
#[cfg(test)]
mod tests;

use crate::{Error, Result};

/// The CUDA C source of every kernel.
pub const KERNELS: &str = include_str!("kernels.cu");

/// cuBLAS workspace bytes (what it recommends for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

/// Every kernel entry point in [`KERNELS`].
pub const KERNEL_NAMES: &[&str] = &[
    "embed",
    "to_bf16",
    "rmsnorm",
    "rmsnorm_add",
    "qk_norm_rope",
    "attention",
    "attention_prefill",
    "router_topk",
    "moe_permute",
    "grouped_matmul",
    "grouped_mma",
    "swiglu",
    "moe_combine",
    "logprob_gather",
    "argmax_rows",
];

fn device_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// True when libnvrtc can be loaded (from `LD_LIBRARY_PATH` or the system's library path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles [`KERNELS`] to PTX for compute capability `major.minor` with NVRTC.
pub fn compile_kernels(major: i32, minor: i32) -> Result<String> {
    if !nvrtc_available() {
        return Err(Error::Device(
            "libnvrtc was not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put \
             its lib folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{major}{minor}"),
            "--std=c++17".into(),
        ],
        name: Some("moeval_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(KERNELS, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::Device(format!(
            "NVRTC could not compile the kernels:\n{}",
            log.to_string_lossy()
        )),
        e => device_err("NVRTC failed", e),
    })?;
    Ok(ptx.to_src())
}

/// A compiled kernel set is cached per compute capability and source, so a process (and the next one)
/// compiles at most once.
fn cached_ptx(major: i32, minor: i32) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    KERNELS.hash(&mut h);
    let dir = std::env::var_os("MOEVAL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moeval")))
        .map(|d| d.join("kernels"));
    let file = dir
        .as_ref()
        .map(|d| d.join(format!("sm{major}{minor}-{:016x}.ptx", h.finish())));
    if let Some(ptx) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        return Ok(ptx);
    }
    let ptx = compile_kernels(major, minor)?;
    if let (Some(dir), Some(file)) = (dir, file) {
        // A cache that cannot be written only costs a recompile next time.
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &file);
        }
    }
    Ok(ptx)
}

/// One GPU: its context, the stream every launch goes to, cuBLAS and the loaded kernels.
pub(crate) struct Gpu {
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    kernels: HashMap<&'static str, CudaFunction>,
    pub name: String,
    pub profiling: bool,
    /// Decoding steps replay as CUDA graphs unless `MOEVAL_CUDA_GRAPHS=0`.
    pub graphs: bool,
}

/// With `MOEVAL_CUDA_PROFILE=1`: seconds and calls per GPU operation, each timed between stream
/// synchronisations (which slows everything down). See [`take_profile`].
static PROFILE: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Decoding-step shapes captured as CUDA graphs so far in this process.
pub(crate) static GRAPHS_CAPTURED: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many decoding-step shapes this process has captured as CUDA graphs (each replays from then on).
pub fn graphs_captured() -> usize {
    GRAPHS_CAPTURED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The GPU time per operation since the last call, as a table, when `MOEVAL_CUDA_PROFILE=1` is set
/// (`None` otherwise); resets the counts.
pub fn take_profile() -> Option<String> {
    let mut p = PROFILE.lock().unwrap_or_else(|p| p.into_inner());
    if p.is_empty() {
        return None;
    }
    let total: f64 = p.values().map(|v| v.0).sum();
    let mut rows: Vec<_> = p.iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut out = format!("GPU time by operation, {:.2} ms in all:\n", total * 1e3);
    for (what, (secs, calls)) in rows {
        out += &format!(
            "  {what:<16} {:>9.2} ms {:>5.1}% {calls:>7} calls\n",
            secs * 1e3,
            100.0 * secs / total.max(1e-12)
        );
    }
    p.clear();
    Some(out)
}

// SAFETY: the cuBLAS handle is only used through `&Gpu` from one thread at a time: `CudaModel`
// serialises every forward pass behind a mutex.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Opens GPU `ordinal`, or says clearly why it cannot.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "--device cuda: no NVIDIA driver found (libcuda.so could not be loaded); run on a machine \
                 with an NVIDIA GPU and driver, or use --device cpu"
                    .into(),
            ));
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "--device cuda: libcublas was not found; install the CUDA toolkit (or the \
                 nvidia-cublas wheel) and put its lib folder on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| device_err("cuDeviceGetCount", e))?;
        if ordinal as i32 >= count {
            return Err(Error::Device(format!(
                "--device cuda:{ordinal}: this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| device_err("cannot open the GPU", e))?;
        // One stream orders everything, so cudarc's per-buffer event tracking is not needed.
        // SAFETY: no buffer is shared between streams.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_err("compute capability", e))?;
        // A stream of our own: the legacy default stream cannot be captured into CUDA graphs.
        let stream = ctx
            .new_stream()
            .map_err(|e| device_err("cannot create a CUDA stream", e))?;
        let ptx = cached_ptx(major, minor)?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| device_err("cannot load the compiled kernels", e))?;
        let mut kernels = HashMap::new();
        for &k in KERNEL_NAMES {
            let f = module
                .load_function(k)
                .map_err(|e| device_err(&format!("kernel {k}"), e))?;
            kernels.insert(k, f);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_err("cuBLAS", e))?;
        // A workspace of its own lets cuBLAS pick its fastest Hopper kernels (split-K and others).
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(|e| device_err("cuBLAS workspace", e))?;
        {
            let (p, _) = workspace.device_ptr(&stream);
            // SAFETY: the workspace outlives the handle (both live in this struct, dropped together).
            unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), p as *mut _, BLAS_WORKSPACE) }
                .result()
                .map_err(|e| device_err("cuBLAS workspace", e))?;
        }
        let profiling = std::env::var_os("MOEVAL_CUDA_PROFILE").is_some_and(|v| v != "0");
        let graphs = std::env::var_os("MOEVAL_CUDA_GRAPHS").is_none_or(|v| v != "0");
        Ok(Self {
            stream,
            blas,
            _workspace: workspace,
            kernels,
            name,
            profiling,
            graphs,
        })
    }

    /// Runs `f`, timing it when profiling.
    pub fn timed<R>(&self, what: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if !self.profiling {
            return f();
        }
        self.stream.synchronize().map_err(|e| device_err(what, e))?;
        let t = std::time::Instant::now();
        let r = f()?;
        self.stream.synchronize().map_err(|e| device_err(what, e))?;
        let mut p = PROFILE.lock().unwrap_or_else(|p| p.into_inner());
        let e = p.entry(what).or_insert((0.0, 0));
        e.0 += t.elapsed().as_secs_f64();
        e.1 += 1;
        Ok(r)
    }

    /// Copies host values to a device address.
    pub fn put<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` addresses at least `size_of_val(src)` bytes of a live device buffer; a copy
        // from pageable memory is staged before this returns, so `src` may be dropped after.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| device_err("upload to the GPU", e))
    }

    /// Copies device values at `src` into `dst`, waiting for them.
    pub fn get<T>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: `src` addresses at least `size_of_val(dst)` bytes of a live device buffer.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| device_err("download from the GPU", e))?;
        self.stream
            .synchronize()
            .map_err(|e| device_err("GPU work failed", e))
    }

    pub fn kernel(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| device_err("upload to the GPU", e))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| device_err("download from the GPU", e))
    }

    pub fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| device_err(&format!("cannot allocate {len} elements on the GPU"), e))
    }

    /// The raw device address of a buffer (kernels take addresses; the stream orders every use).
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _) = s.device_ptr(&self.stream);
        p
    }

    /// `y[m, n] (f32) = x[m, k] (bf16) · w[n, k]ᵀ (bf16) + beta · y`, accumulating in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        // Row-major y = x wᵀ is column-major yᵀ = w xᵀ: A = w (k x n, transposed), B = x (k x m).
        // SAFETY: the caller passes device buffers of at least these sizes, live until the stream
        // has run this call.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| device_err("cuBLAS GEMM", e))
    }
}

/// f32 → bf16 bits, rounding to nearest even (what the kernels and every framework do).
pub(crate) fn bf16_bits(values: &[f32]) -> Vec<u16> {
    use rayon::prelude::*;
    values
        .par_iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}
